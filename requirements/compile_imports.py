"""Write bytecode for what a server start imports, and only that.

The image installs packages with `pip install --no-compile` (bytecode for every module of torch,
transformers, sympy, ... is ~270 MB, most of it never imported), then runs this once with bytecode
writing on: the modules `loradock serve` imports on its way to ready get their .pyc files, so a
start does not pay for compiling them (about 3 s on 2 cores).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

import loradock.service.app
import loradock.service.cli  # noqa: F401
from loradock.adapters.core.base import BaseModel
from loradock.adapters.core.presets import resolve_base_model

# The default encoder, loaded as the server loads it (tokenizer, BERT modeling, safetensors),
# then a forward and a backward pass: the libraries still work after slim_venv.sh stripped them.
base = BaseModel.load(resolve_base_model(None, Path("/nonexistent")).path, device="cpu")
batch = base.tokenize(["the image works", "a second text"])
hidden = base.hidden_states(batch["input_ids"], batch["attention_mask"])
weight = torch.ones(hidden.shape[-1], requires_grad=True)
(hidden.float() @ weight).sum().backward()
assert weight.grad is not None
assert torch.isfinite(weight.grad).all()
# The causal LM's modeling code and the GGUF reader (loading it converts the file: not here).
for name in ("transformers.models.llama.modeling_llama", "gguf", "pyarrow.parquet",
             "psycopg", "s3fs", "uvloop", "opentelemetry.sdk.trace",
             "opentelemetry.exporter.otlp.proto.http.trace_exporter"):  # fmt: skip
    importlib.import_module(name)
print("compiled the start-up imports")
