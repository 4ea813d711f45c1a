"""Training hyperparameters: validated, documented, shown in the OpenAPI schema."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel as Schema
from pydantic import ConfigDict, Field, field_validator

MAX_CLASS_WEIGHT = 1e6
# LoRA+ ratio (B's learning rate over A's) when not given, per kind of base.
B_RATIO_DEFAULT = {"encoder": 4.0, "causal_lm": 1.0}


class Hyperparameters(Schema):
    """Training knobs; every one optional with a default that works on small text datasets."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # every float finite

    rank: int = Field(8, ge=1, le=256, description="LoRA rank r.")
    alpha: float = Field(16.0, gt=0, le=4096, description="LoRA alpha; scale = alpha / rank.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the LoRA path.")
    learning_rate: float = Field(
        1e-3,
        gt=0,
        le=10,
        description="Peak learning rate of the LoRA matrices (1e-3: better held-out macro-F1 "
        "than 3e-3 on three real sets, bench/README.md).",
    )
    b_learning_rate_ratio: float | None = Field(
        None,
        gt=0,
        le=1000,
        description="LoRA+: the B matrices learn at this multiple of learning_rate (1: plain "
        "LoRA). Default: 4 for encoder adapters (the same held-out macro-F1 on three real sets in "
        "about half the training time, bench/README.md), 1 for generation (not yet measured).",
    )
    head_learning_rate: float | None = Field(
        None, gt=0, le=10, description="Peak learning rate of the head; default learning_rate."
    )
    epochs: int = Field(
        20, ge=1, le=1000, description="Most epochs (early stopping may end sooner)."
    )
    batch_size: int = Field(16, ge=1, le=1024)
    gradient_accumulation_steps: int = Field(
        1,
        ge=1,
        le=1024,
        description="Batches whose gradients add up to one optimizer step (generation: the "
        "loss is normalized over the whole accumulated batch's target tokens).",
    )
    mixed_precision: Literal["auto", "bf16", "no"] = Field(
        "auto",
        description="Generation training: bf16 autocast with fp32 master weights where the "
        "hardware runs bf16 natively (auto), always (bf16), or plain fp32 (no).",
    )
    patience: int = Field(
        3, ge=1, le=100, description="Evaluations without improvement before stopping."
    )
    min_delta: float = Field(0.0, ge=0, description="Smallest validation-loss drop that counts.")
    early_stopping: bool = Field(True, description="Stop on validation loss; off = run all epochs.")
    weight_decay: float = Field(0.01, ge=0, le=1)
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="Share of steps with linear warm-up.")
    max_grad_norm: float = Field(1.0, gt=0, le=1e6, description="Gradient clipping norm.")
    target_modules: list[str] | None = Field(
        None,
        min_length=1,
        description="Linear layer names to adapt; default attention projections.",
    )
    trainable_layers: int | list[int] | None = Field(
        None,
        description="Blocks that get LoRA: k = the top k blocks, a list = those block indices, "
        "null = all. Lower frozen blocks are computed once per text and cached.",
    )
    class_weights: Literal["balanced"] | dict[str, float] | None = Field(
        None,
        description="'balanced' (inverse class frequency) or a weight per label (finite, "
        "positive; labels not named weigh 1).",
    )
    eval_every_steps: int | None = Field(
        None,
        ge=1,
        le=10_000_000,
        description="Also validate every N steps (early stopping counts those too).",
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=1, description="Label smoothing of the cross-entropy (classification)."
    )
    init_head_l2: float = Field(
        0.05,
        gt=0,
        le=1e6,
        description="L2 strength of the linear probe the LoRA head starts from. The baseline "
        "probe's own L2 is chosen by cross-validation and fits the training rows closely; "
        "starting from a more regularized head leaves LoRA something to learn "
        "(measured in bench/README.md).",
    )
    serve: Literal["best", "lora", "probe", "base"] = Field(
        "best",
        description="What the version serves. 'best': LoRA or the cheaper alternative (the "
        "linear probe; for generation the base model without an adapter), whichever validates "
        "better on the task's decision metric (a tie, within one validation text, goes to the "
        "lower validation loss); 'lora': LoRA even where the alternative validates better; "
        "'probe': the probe alone, without training LoRA (head-based tasks); 'base': the base "
        "model alone (generation).",
    )
    cv_folds: int = Field(5, ge=2, le=10, description="Folds for datasets under 50 rows.")
    seed: int = Field(0, ge=0, le=2**31 - 1)

    def b_learning_rate_ratio_for(self, kind: str) -> float:
        """The LoRA+ ratio for a base of `kind` ("encoder" or "causal_lm")."""
        if self.b_learning_rate_ratio is not None:
            return self.b_learning_rate_ratio
        return B_RATIO_DEFAULT.get(kind, 1.0)

    @field_validator("target_modules")
    @classmethod
    def _names(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and any(not s or "." in s or len(s) > 64 for s in v):
            raise ValueError("target_modules are layer name suffixes like 'query' or 'q_proj'")
        return v

    @field_validator("trainable_layers")
    @classmethod
    def _layers(cls, v: int | list[int] | None) -> int | list[int] | None:
        if isinstance(v, int) and not 1 <= v <= 1024:
            raise ValueError("a number of top blocks must be at least 1")
        if isinstance(v, list):
            if not v:
                raise ValueError("an empty list trains no block; give indices, a count or null")
            if any(i < 0 for i in v):
                raise ValueError("block indices start at 0")
            if len(v) > 1024:
                raise ValueError("at most 1024 block indices")
        return v

    @field_validator("class_weights", mode="before")
    @classmethod
    def _weights(cls, v: Any) -> Any:
        if isinstance(v, dict):
            if len(v) > 10_000:
                raise ValueError("at most 10000 labels")
            bad = {
                k: w
                for k, w in v.items()
                if isinstance(w, bool)
                or not isinstance(w, (int, float))
                or not 0 < w <= MAX_CLASS_WEIGHT  # NaN fails this too
            }
            if bad:
                raise ValueError(
                    f"weights must be finite, positive and at most {MAX_CLASS_WEIGHT:g}; "
                    f"got {dict(list(bad.items())[:3])}"
                )
        return v
