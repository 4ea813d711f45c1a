"""Serving: the slot pool of LoRA weights (BGMV) and the engine that runs mixed-adapter batches."""
