"""The shared frozen base model and the LoRA math on it: loading, devices, in-place LoRA layers,
the frozen-block cache, and the gate that gives serving priority over training."""
