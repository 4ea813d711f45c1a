"""Exports a version as files other tools load: a PEFT adapter folder, or a sentence-transformers
model. Both carry the head, a model card and loradock.json (with the base's fingerprint).

- ``peft``: adapter_config.json (`task_type` FEATURE_EXTRACTION, `base_model_name_or_path` the
  base's Hugging Face id) and adapter_model.safetensors, for
  `PeftModel.from_pretrained(AutoModel...)`; the head is `head.safetensors` (`weight`
  [outputs, hidden], `bias` [outputs]) applied to the attention-masked mean of the last hidden
  state, described by `head_config.json`. (The head cannot be a peft `modules_to_save` module:
  mean pooling plus a linear head is no module of `AutoModel`, and a
  `*ForSequenceClassification` model pools differently.) A version that serves the linear probe
  has no LoRA: its export is head-only, and the card says so.
- ``sentence-transformers``: a complete model folder: the base with LoRA merged into its weights,
  mean pooling, and the head as a `Dense` module with identity activation, so
  `SentenceTransformer(path).encode(texts)` returns the head's outputs (logits; values for
  regression). Drop the last module for the adapted encoder's embeddings.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save as st_save

from loradock.adapters.artifacts.files import HEAD, META, AdapterModel, peft_task_type
from loradock.adapters.core.base import BaseModel

FORMATS = ("peft", "sentence-transformers")
HEAD_CONFIG = "head_config.json"
CARD = "README.md"
# What a model folder holds beside its weights that a loader needs (tokenizer and config).
_COPIED = (
    "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json", "spiece.model",
    "sentencepiece.bpe.model", "tokenizer.model",
)  # fmt: skip


class ExportError(ValueError):
    """This version cannot be exported in this format (the message says why)."""


def export_files(
    model: AdapterModel, base: BaseModel, fmt: str, *, base_model_id: str, name: str
) -> dict[str, bytes]:
    """The files of `model` (a loaded version) in format `fmt`, ready to zip."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; formats: {list(FORMATS)}")
    if model.head is None:
        return _generation_export(model, base, fmt, base_model_id=base_model_id, name=name)
    head, spec = model.task.export_head(model.head)
    head_config = {
        "pooling": "mean",
        "max_length": base.max_length,
        "task": model.task.name,
        **spec,
        "hidden_size": int(head.weight.shape[1]),
        "base_model": base_model_id,
        "base_fingerprint": base.fingerprint,
        "has_lora": model.weights is not None,
    }
    files: dict[str, bytes] = {
        META: json.dumps(model.meta, indent=2, sort_keys=True).encode(),
        HEAD_CONFIG: json.dumps(head_config, indent=2).encode(),
    }
    if fmt == "peft":
        files[HEAD] = st_save(
            {"weight": head.weight.float().contiguous(), "bias": head.bias.float().contiguous()}
        )
        if model.weights is not None:
            config = model.weights.peft_config(base_model_id)
            config["task_type"] = "FEATURE_EXTRACTION"
            files["adapter_config.json"] = json.dumps(config, indent=2, sort_keys=True).encode()
            files["adapter_model.safetensors"] = st_save(model.weights.peft_state_dict())
    else:
        files.update(_sentence_transformers(model, base, head))
    files[CARD] = model_card(model, head_config, fmt, name).encode()
    return files


def _generation_export(
    model: AdapterModel, base: BaseModel, fmt: str, *, base_model_id: str, name: str
) -> dict[str, bytes]:
    """A generation adapter: the PEFT folder for `AutoModelForCausalLM` (task_type CAUSAL_LM),
    `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model_id), folder)`."""
    if fmt != "peft":
        raise ExportError(f"a {model.task.name} adapter exports as peft only (no {fmt} model)")
    if model.weights is None:
        raise ExportError(
            "this version serves the base model without an adapter (the adapter did not beat "
            "it on validation): there is nothing to export; use the base model itself"
        )
    config = model.weights.peft_config(
        base_model_id, module_prefix=base.lm_prefix, task_type=peft_task_type(base)
    )
    metrics = model.meta.get("metrics") or {}
    shown = ("val_loss", "val_token_accuracy", "base_val_loss", "base_val_token_accuracy",
             "reference_perplexity", "base_reference_perplexity", "best_epoch")  # fmt: skip
    data = model.meta.get("data") or {}
    card = [
        "---", "library_name: peft", f"base_model: {base_model_id}",
        "pipeline_tag: text-generation", "tags:", "- loradock", f"- {model.task.name}", "- lora",
        "---", "", f"# {name} (version {model.meta.get('version')})", "",
        f"A LoRA adapter trained by loradock (supervised fine-tuning) on the frozen base "
        f"`{base_model_id}` (fingerprint `{base.fingerprint}`). LoRA rank "
        f"{model.weights.spec.rank}, alpha {model.weights.spec.alpha:g} on "
        f"{len(model.weights.names)} modules ({', '.join(model.weights.spec.target_modules)}).",
        "", "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'base = AutoModelForCausalLM.from_pretrained("{base_model_id}")',
        'model = PeftModel.from_pretrained(base, "this folder")',
        f'tokenizer = AutoTokenizer.from_pretrained("{base_model_id}")  # its chat template',
        "```", "", "## Validation (held-out rows; loss per target token)", "",
        "| metric | value |", "|---|---|",
        *(f"| {k} | {metrics[k]} |" for k in shown if metrics.get(k) is not None),
        "", f"Data: {data.get('rows')} rows; validation: {data.get('validation')}; "
        f"{data.get('warnings', 0)} warnings.", "",
    ]  # fmt: skip
    return {
        META: json.dumps(model.meta, indent=2, sort_keys=True).encode(),
        "adapter_config.json": json.dumps(config, indent=2, sort_keys=True).encode(),
        "adapter_model.safetensors": st_save(model.weights.peft_state_dict(base.lm_prefix)),
        CARD: "\n".join(card).encode(),
    }


def zip_files(files: dict[str, bytes], folder: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for fname in sorted(files):
            zf.writestr(f"{folder}/{fname}", files[fname])
    return buf.getvalue()


# --- sentence-transformers ---------------------------------------------------------------------


def _sentence_transformers(model: AdapterModel, base: BaseModel, head: Any) -> dict[str, bytes]:
    src = Path(base.path)
    weights_file = src / "model.safetensors"
    if not weights_file.is_file():
        raise ExportError(
            "a sentence-transformers export needs the base's weights as one model.safetensors "
            f"file; {base.name} has none (sharded or .bin weights)"
        )
    state = st_load_file(str(weights_file))
    if model.weights is not None:
        _merge(state, model.weights)
    files = {name: (src / name).read_bytes() for name in _COPIED if (src / name).is_file()}
    files["model.safetensors"] = st_save({k: v.contiguous() for k, v in state.items()})
    files["modules.json"] = json.dumps(
        [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {
                "idx": 1,
                "name": "1",
                "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling",
            },
            {
                "idx": 2,
                "name": "2",
                "path": "2_Dense",
                "type": "sentence_transformers.models.Dense",
            },
        ],
        indent=2,
    ).encode()
    files["sentence_bert_config.json"] = json.dumps(
        {"max_seq_length": base.max_length, "do_lower_case": False}, indent=2
    ).encode()
    files["config_sentence_transformers.json"] = json.dumps(
        {"__version__": {"sentence_transformers": "3.0.0"}, "prompts": {},
         "default_prompt_name": None, "similarity_fn_name": None},
        indent=2,
    ).encode()  # fmt: skip
    files["1_Pooling/config.json"] = json.dumps(
        {"word_embedding_dimension": base.hidden_size, "pooling_mode_cls_token": False,
         "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
         "pooling_mode_mean_sqrt_len_tokens": False},
        indent=2,
    ).encode()  # fmt: skip
    files["2_Dense/config.json"] = json.dumps(
        {"in_features": int(head.weight.shape[1]), "out_features": int(head.weight.shape[0]),
         "bias": True, "activation_function": "torch.nn.modules.linear.Identity"},
        indent=2,
    ).encode()  # fmt: skip
    files["2_Dense/model.safetensors"] = st_save(
        {"linear.weight": head.weight.float().contiguous(),
         "linear.bias": head.bias.float().contiguous()}
    )  # fmt: skip
    return files


def _merge(state: dict[str, torch.Tensor], weights: Any) -> None:
    """W += scale * B @ A for every LoRA module, in the weights' own dtype (computed in fp32)."""
    for i, name in enumerate(weights.names):
        key = _weight_key(state, name)
        w = state[key]
        a = weights.A[i].detach().float().cpu()
        b = weights.B[i].detach().float().cpu()
        state[key] = (w.float() + weights.spec.scale * (b @ a)).to(w.dtype)


def _weight_key(state: dict[str, torch.Tensor], module: str) -> str:
    """The weight of `module` (a path inside the backbone) among a checkpoint's keys, which may
    carry a prefix (`bert.`, `model.`)."""
    exact = f"{module}.weight"
    if exact in state:
        return exact
    found = [k for k in state if k.endswith(f".{exact}")]
    if len(found) != 1:
        raise ExportError(f"cannot find the weight of {module} in the base checkpoint")
    return found[0]


# --- model card --------------------------------------------------------------------------------


def model_card(model: AdapterModel, head: dict[str, Any], fmt: str, name: str) -> str:
    meta = model.meta
    version = meta.get("version")
    task = model.task.name
    winner = meta.get("winner") or ("lora" if model.weights is not None else "probe")
    metrics = meta.get("metrics") or {}
    baseline = meta.get("baseline") or {}
    served = metrics if winner == "lora" else baseline
    keys = sorted(k for k in {**metrics, **baseline} if k.startswith("val_"))
    lines = [
        "---",
        f"library_name: {'peft' if fmt == 'peft' else 'sentence-transformers'}",
        f"base_model: {head['base_model']}",
        "pipeline_tag: text-classification",
        "tags:",
        "- loradock",
        f"- {task}",
        *(["- lora"] if model.weights is not None else ["- linear-probe"]),
        "---",
        "",
        f"# {name} (version {version})",
        "",
        f"A {task} adapter trained by loradock on the frozen base `{head['base_model']}` "
        f"(fingerprint `{head['base_fingerprint']}`).",
        "",
    ]
    if model.weights is None:
        lines += [
            "**This version is head-only.** It serves the linear probe (a logistic or linear "
            "regression on the frozen base's mean-pooled embeddings): there are no LoRA weights, "
            "only the head.",
            "",
        ]
    else:
        spec = model.weights.spec
        targets = ", ".join(spec.target_modules)
        lines += [
            f"LoRA rank {spec.rank}, alpha {spec.alpha:g} on {len(model.weights.names)} modules "
            f"({targets}), plus a linear head.",
            "",
        ]
    if meta.get("winner_reason"):
        lines += [f"Why this model: {meta['winner_reason']}.", ""]
    data = meta.get("data") or {}
    if data:
        lines += ["## Data", ""]
        lines += [f"- {k.replace('_', ' ')}: {v}" for k, v in data.items()]
        lines += [""]
    outputs = head.get("outputs") or []
    lines += ["## Outputs", "", f"{len(outputs)} outputs: {', '.join(map(str, outputs[:50]))}"
              f"{' ...' if len(outputs) > 50 else ''}. {head.get('decode', '')}.", ""]  # fmt: skip
    if keys:
        lines += ["## Validation metrics", "", "| metric | served model | linear probe |",
                  "|---|---|---|"]  # fmt: skip
        lines += [f"| {k[4:]} | {_num(served.get(k))} | {_num(baseline.get(k))} |" for k in keys]
        lines += [""]
    hp = meta.get("hyperparameters") or {}
    if hp:
        lines += ["## Training hyperparameters", "", "```json",
                  json.dumps(hp, indent=1, sort_keys=True), "```", ""]  # fmt: skip
    lines += ["## Usage", "", "```python", *_usage(fmt, head, model.weights is not None), "```", ""]
    return "\n".join(lines)


def _num(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, int | float) else "-"


def _usage(fmt: str, head: dict[str, Any], has_lora: bool) -> list[str]:
    finish = {
        "softmax": "probs = outputs.softmax(-1)  # scores per label, in head_config.json's order",
        "sigmoid": "probs = outputs.sigmoid()  # compare with head_config.json's thresholds",
        "identity": "values = outputs[:, 0]",
    }[head["activation"]]
    if fmt == "sentence-transformers":
        return [
            "from sentence_transformers import SentenceTransformer",
            "",
            'model = SentenceTransformer("path/to/this/folder")',
            'outputs = model.encode(["some text"], convert_to_tensor=True)',
            finish,
        ]
    load = [
        "import json, torch",
        "from safetensors.torch import load_file",
        "from transformers import AutoModel, AutoTokenizer",
    ]
    if has_lora:
        load.append("from peft import PeftModel")
    load += [
        "",
        f'base = "{head["base_model"]}"',
        "tokenizer = AutoTokenizer.from_pretrained(base)",
        "model = AutoModel.from_pretrained(base)",
    ]
    if has_lora:
        load.append('model = PeftModel.from_pretrained(model, "path/to/this/folder")')
    return [
        *load,
        "model.eval()",
        'head = load_file("path/to/this/folder/head.safetensors")',
        f'batch = tokenizer(["some text"], padding=True, truncation=True, '
        f'max_length={head["max_length"]}, return_tensors="pt")',
        "with torch.no_grad():",
        "    hidden = model(**batch).last_hidden_state",
        '    mask = batch["attention_mask"].unsqueeze(-1).float()',
        "    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)",
        '    outputs = pooled @ head["weight"].T + head["bias"]',
        finish,
    ]
