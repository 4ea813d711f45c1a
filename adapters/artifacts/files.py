"""Adapter artifacts: what a trained version is on disk, and how to run it.

Files of a version (all safetensors or JSON; the store adds manifest.json last):
- adapter_config.json, adapter_model.safetensors: PEFT LoRA format (absent for a head-only version,
  and for a generation version that serves the base); for a causal-LM base, `task_type` CAUSAL_LM
  and keys of the whole `*ForCausalLM` (`PeftModel.from_pretrained` on the base loads them)
- head.safetensors: `weight` [out, hidden], `bias` [out] (absent for generation: no head)
- loradock.json: task and the task's own section (`Task.meta`: labels, label scaling, ...), winner
  and why, base fingerprint, metrics
- reference.json, reference.safetensors: the reference profile for drift
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from loradock.adapters import tasks
from loradock.adapters.artifacts.store import ArtifactStore
from loradock.adapters.core import lora
from loradock.adapters.core.base import BaseModel
from loradock.adapters.monitoring.profile import build_profile
from loradock.adapters.tasks.base import Task, TaskStateError
from loradock.adapters.tasks.probe import LinearHead

FORMAT = 1
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
HEAD = "head.safetensors"
META = "loradock.json"
REFERENCE_JSON = "reference.json"
REFERENCE_TENSORS = "reference.safetensors"


class ArtifactError(ValueError):
    """An artifact that cannot be used with this base model."""


@dataclass
class AdapterModel:
    """A runnable adapter: optional LoRA weights plus a head, on one base model."""

    meta: dict[str, Any]
    task: Task
    head: LinearHead | None  # None: a task without a head (generation)
    weights: lora.LoRAWeights | None

    @property
    def labels(self) -> list[str]:
        return self.task.labels

    @torch.inference_mode()
    def forward(
        self, base: BaseModel, texts: Sequence[str], batch_size: int = 64
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(head outputs [n, n_outputs], pooled [n, hidden], token lengths) for texts."""
        assert self.head is not None, "a task without a head has no head outputs"
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        outs, pools, lengths = [], [], [0] * len(texts)
        head = LinearHead(self.head.weight.to(base.device), self.head.bias.to(base.device))
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            batch = base.tokenize([texts[i] for i in idx])
            with lora.active(self.weights):
                hidden = base.hidden_states(batch["input_ids"], batch["attention_mask"])
            pooled = base.mean_pool(hidden, batch["attention_mask"])
            pools.append(pooled.cpu())
            outs.append(head(pooled).float().cpu())
            for j, i in enumerate(idx):
                lengths[i] = int(batch["attention_mask"][j].sum())
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
        return torch.cat(outs)[inverse], torch.cat(pools)[inverse], lengths

    def predict(self, base: BaseModel, texts: Sequence[str]) -> list[dict[str, Any]]:
        outputs, _, _ = self.forward(base, texts)
        return [self.task.decode(row) for row in outputs]


def build_files(
    *,
    base: BaseModel,
    task: Task,
    meta: dict[str, Any],
    head: LinearHead | None,
    weights: lora.LoRAWeights | None,
    profile_texts: Sequence[str],
    profile_outputs: torch.Tensor | None = None,
    seed: int = 0,
) -> dict[str, bytes]:
    """Every file of a version, ready for `ArtifactStore.publish`.

    The reference profile is computed on `profile_texts` with this model; `profile_outputs`
    ([n, n_outputs], e.g. out-of-fold outputs) replaces its head outputs when given.
    """
    meta = {
        **meta,
        "task": task.name,
        **task.meta(),
        "format": FORMAT,
        "base_fingerprint": base.fingerprint,
        "base_model_type": base.model_type,
        "hidden_size": base.hidden_size,
        "max_length": base.max_length,
        "has_lora": weights is not None,
        "has_head": head is not None,
    }
    if head is not None:
        meta["pooling"] = "mean"
    if weights is not None:
        meta["lora"] = {
            "rank": weights.spec.rank,
            "alpha": weights.spec.alpha,
            "dropout": weights.spec.dropout,
            "target_modules": list(weights.spec.target_modules),
            "layers": list(weights.spec.layers) if weights.spec.layers is not None else None,
            "modules": weights.names,
        }
    files: dict[str, bytes] = {META: json.dumps(meta, indent=2, sort_keys=True).encode()}
    if head is not None:
        files[HEAD] = st_save(
            {"weight": head.weight.contiguous().cpu(), "bias": head.bias.contiguous().cpu()}
        )
    if weights is not None:
        config = weights.peft_config(
            base.hf_id or base.name, module_prefix=base.lm_prefix, task_type=peft_task_type(base)
        )
        files[PEFT_CONFIG] = json.dumps(config, indent=2, sort_keys=True).encode()
        files[PEFT_WEIGHTS] = st_save(weights.peft_state_dict(base.lm_prefix))
    model = AdapterModel(meta=meta, task=task, head=head, weights=weights)
    if profile_texts and head is not None:
        outputs, pooled, lengths = model.forward(base, profile_texts)
        if profile_outputs is not None:
            outputs = profile_outputs
        profile, tensors = build_profile(
            task=task,
            outputs=outputs,
            pooled=pooled,
            token_lengths=lengths,
            seed=seed,
        )
        files[REFERENCE_JSON] = json.dumps(profile, sort_keys=True).encode()
        files[REFERENCE_TENSORS] = st_save(tensors)
    elif profile_texts and base.lm is not None:
        profile, tensors = generation_profile(base, task, weights, profile_texts, seed=seed)
        files[REFERENCE_JSON] = json.dumps(profile, sort_keys=True).encode()
        files[REFERENCE_TENSORS] = st_save(tensors)
    return files


@torch.inference_mode()
def generation_profile(
    base: BaseModel,
    task: Task,
    weights: lora.LoRAWeights | None,
    rows: Sequence[str],
    *,
    seed: int = 0,
    batch_size: int = 32,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The reference profile of a generation adapter from reference rows (canonical JSON): the
    prompts' token lengths and mean-pooled last hidden states under the adapter (what the decode
    engine computes while prefilling live prompts), and the answers' token lengths."""
    from loradock.adapters.serving.generation import row_prompt

    prompts, answers = [], []
    for text in rows:
        ids, answer = row_prompt(base, json.loads(text))
        prompts.append(ids[: base.max_length])
        answers.append(answer)
    pools = []
    for s in range(0, len(prompts), batch_size):
        batch = base.to_device(base.pad(prompts[s : s + batch_size]))
        with lora.active(weights):
            hidden = base.hidden_states(batch["input_ids"], batch["attention_mask"])
        pools.append(base.mean_pool(hidden, batch["attention_mask"]).cpu())
    return build_profile(
        task=task,
        outputs=torch.tensor(answers, dtype=torch.float32).view(-1, 1),
        pooled=torch.cat(pools),
        token_lengths=[len(p) for p in prompts],
        seed=seed,
    )


def peft_task_type(base: BaseModel) -> str | None:
    """PEFT's task type of an adapter on this base: CAUSAL_LM for a causal LM; None for an
    encoder (its head lives outside PEFT; exports say FEATURE_EXTRACTION)."""
    return "CAUSAL_LM" if base.lm is not None else None


def check_fits_base(meta: dict[str, Any], base: BaseModel, where: str) -> None:
    """ArtifactError unless `meta` (a loradock.json) is a format this code reads, trained on
    this very base model (an adapter only works on the base it was trained on)."""
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{where}: unsupported artifact format {meta.get('format')!r}")
    if meta.get("base_fingerprint") != base.fingerprint:
        raise ArtifactError(
            f"{where} was trained on base {meta.get('base_fingerprint')!r}, "
            f"this server runs {base.fingerprint!r}"
        )


def load_adapter(store: ArtifactStore, key: str, base: BaseModel) -> AdapterModel:
    """Read and verify a version from the store and check that it fits this base model."""
    meta = json.loads(store.read(key, META))
    check_fits_base(meta, base, key)
    try:
        task = tasks.from_meta(meta)
    except (tasks.UnknownTask, TaskStateError) as e:
        raise ArtifactError(f"{key}: {e}") from e
    head = None
    if meta.get("has_head", True):
        head_t = st_load(store.read(key, HEAD))
        head = LinearHead(weight=head_t["weight"], bias=head_t["bias"])
    weights = None
    if meta.get("has_lora"):
        spec_d = meta["lora"]
        spec = lora.LoRASpec(
            rank=int(spec_d["rank"]),
            alpha=float(spec_d["alpha"]),
            dropout=float(spec_d["dropout"]),
            target_modules=tuple(spec_d["target_modules"]),
            layers=tuple(spec_d["layers"]) if spec_d.get("layers") is not None else None,
        )
        tensors = st_load(store.read(key, PEFT_WEIGHTS))
        weights = lora.LoRAWeights.from_peft(
            spec, tensors, device=base.device, dtype=base.dtype, module_prefix=base.lm_prefix
        )
        lora.install(base.backbone, weights.names)
    return AdapterModel(meta=meta, task=task, head=head, weights=weights)
