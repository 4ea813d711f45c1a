"""The generation task: a LoRA adapter on a causal-LM base, trained by supervised fine-tuning.

Rows come in OpenAI's two fine-tuning formats:
- chat: ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``; the
  loss is on assistant turns only (an assistant message may carry ``"weight": 0`` to be context,
  as in OpenAI's format); the base's chat template renders the conversation;
- completion: ``{"prompt": str, "completion": str}``; the loss is on the completion and the end
  of sequence token that follows it.

A row becomes an `Example` whose `text` is the row's canonical JSON (so exact duplicates and
train/validation leakage are found by the same code as for the other tasks) and whose label is
the row's format. Generation has no head: the SFT trainer (adapters/training/sft.py) trains it,
the frozen base without an adapter is its baseline, and validation loss (mean cross-entropy per
target token) decides; the head-based parts of `Task` do not apply and say so if called.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from loradock.adapters.core.text import encoding_problem
from loradock.adapters.monitoring.drift import psi_signal
from loradock.adapters.monitoring.profile import histogram
from loradock.adapters.tasks.base import Task, TaskStateError
from loradock.adapters.tasks.probe import LinearHead

if TYPE_CHECKING:
    from loradock.adapters.training.data import Dataset, Example

ROLES = ("system", "user", "assistant")
OUTPUT_LENGTH_EDGES = (4, 8, 16, 32, 64, 128, 256, 512)  # answer tokens; one more bin above
CHAT, COMPLETION = "chat", "completion"


class NoHead(TypeError):
    """A head-based operation asked of the generation task (a bug in the caller)."""


def _text(content: Any) -> str | None:
    """A message's content as one string: a string, or OpenAI's list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(str(p["text"]) for p in content)
    return None


def parse_messages(
    messages: Any, max_chars: int, *, needs_assistant: bool = True
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """(normalized messages, problems as (field, message)) of a chat's `messages`; a training
    row `needs_assistant` turn to learn from, a request to answer does not."""
    problems: list[tuple[str, str]] = []
    if not isinstance(messages, list) or not messages:
        return [], [("messages", "must be a non-empty list of {role, content} objects")]
    out: list[dict[str, Any]] = []
    total = 0
    for j, m in enumerate(messages):
        where = f"messages[{j}]"
        if not isinstance(m, Mapping):
            problems.append((where, "must be an object with role and content"))
            continue
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ROLES:
            problems.append((f"{where}.role", f"unknown role {role!r}; expected one of {ROLES}"))
            continue
        content = _text(m.get("content"))
        if content is None:
            problems.append((f"{where}.content", "missing, or not a string / list of text parts"))
            continue
        if not content.strip():
            problems.append((f"{where}.content", "empty content"))
            continue
        if (problem := encoding_problem(content)) is not None:
            problems.append((f"{where}.content", problem))
            continue
        total += len(content)
        msg: dict[str, Any] = {"role": role, "content": content}
        if "weight" in m:
            weight = m.get("weight")
            if role != "assistant" or weight not in (0, 1) or isinstance(weight, bool):
                problems.append((f"{where}.weight", "only an assistant turn has a weight, 0 or 1"))
                continue
            if weight == 0:
                msg["weight"] = 0
        out.append(msg)
    if not problems:
        learnable = any(m["role"] == "assistant" and m.get("weight", 1) for m in out)
        if needs_assistant and not learnable:
            problems.append(("messages", "no assistant turn to learn from (with weight 1)"))
        elif total > max_chars:
            problems.append(("messages", f"{total} characters exceed the limit of {max_chars}"))
    return out, problems


class Generation(Task):
    """Supervised fine-tuning of a causal LM: chats or prompt/completion pairs."""

    name = "generation"
    decision_metric = "val_loss"
    higher_is_better = False
    base_kind: ClassVar[str] = "causal_lm"
    has_head: ClassVar[bool] = False
    custom_rows: ClassVar[bool] = True
    summary_keys = ("loss", "token_accuracy")

    def __init__(self, formats: Sequence[str]) -> None:
        self.formats = sorted(set(formats))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Generation) and other.formats == self.formats

    def __hash__(self) -> int:
        return hash(tuple(self.formats))

    # --- rows ----------------------------------------------------------------------------------

    @classmethod
    def check_row(
        cls, row: Mapping[str, Any], max_chars: int
    ) -> tuple[tuple[str, str] | None, list[tuple[str, str]]]:
        """((canonical text, format), []) for a good row, (None, problems) otherwise."""
        if "messages" in row:
            messages, problems = parse_messages(row.get("messages"), max_chars)
            if problems:
                return None, problems
            return (json.dumps({"messages": messages}, sort_keys=True), CHAT), []
        if "prompt" in row or "completion" in row:
            problems = []
            prompt, completion = row.get("prompt"), row.get("completion")
            if not isinstance(prompt, str):
                problems.append(("prompt", "missing or not a string"))
            if not isinstance(completion, str):
                problems.append(("completion", "missing or not a string"))
            elif not completion.strip():
                problems.append(("completion", "empty completion: nothing to learn"))
            if problems:
                return None, problems
            assert isinstance(prompt, str)
            assert isinstance(completion, str)
            for name, value in (("prompt", prompt), ("completion", completion)):
                if (problem := encoding_problem(value)) is not None:
                    problems.append((name, problem))
            if len(prompt) + len(completion) > max_chars:
                problems.append(
                    ("completion", f"{len(prompt) + len(completion)} characters exceed the "
                     f"limit of {max_chars}")
                )  # fmt: skip
            if problems:
                return None, problems
            row_json = json.dumps({"prompt": prompt, "completion": completion}, sort_keys=True)
            return (row_json, COMPLETION), []
        return None, [(
            "messages",
            'a generation row is {"messages": [{"role", "content"}, ...]} or '
            '{"prompt": str, "completion": str}',
        )]  # fmt: skip

    @classmethod
    def trainer(cls, base: Any, gate: Any) -> Any:
        from loradock.adapters.training.sft import SFTTrainer

        return SFTTrainer(base, gate)

    @classmethod
    def hyperparameter_problems(cls, hp: Any) -> list[str]:
        if hp.serve == "probe":
            return ["serve='probe': generation has no linear probe; its cheaper alternative is "
                    "the base model (serve='base')"]  # fmt: skip
        return []

    @staticmethod
    def row(example: Example) -> dict[str, Any]:
        """The normalized row an example was made from."""
        return dict(json.loads(example.text))

    @classmethod
    def parse_label(cls, value: Any) -> str:
        return str(value)

    @classmethod
    def check_labels(cls, examples: Sequence[Example], dataset: str) -> tuple[list[str], list[str]]:
        formats = sorted({str(e.label) for e in examples})
        warnings = []
        if len(formats) > 1:
            warnings.append(f"{dataset}: mixes chat and prompt/completion rows")
        return [], warnings

    @classmethod
    def strata(cls, examples: Sequence[Example]) -> list[str]:
        return [str(e.label) for e in examples]

    @classmethod
    def cv_folds(cls, train: Dataset, wanted: int) -> int:
        return max(2, min(wanted, len(train.examples)))

    # --- state ---------------------------------------------------------------------------------

    @classmethod
    def from_dataset(cls, train: Dataset) -> Generation:
        return cls([str(e.label) for e in train.examples])

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> Generation:
        formats = meta.get("formats")
        if (
            not isinstance(formats, list)
            or not formats
            or not all(f in (CHAT, COMPLETION) for f in formats)
        ):
            raise TaskStateError("formats must be a list of 'chat' and/or 'completion'")
        return cls(formats)

    def meta(self) -> dict[str, Any]:
        return {"formats": list(self.formats), "labels": []}

    @property
    def n_outputs(self) -> int:
        return 0

    # --- what a head-based task does, and generation does not ----------------------------------

    def _no_head(self, what: str) -> NoHead:
        return NoHead(f"generation adapters have no head: {what} does not apply")

    def targets(self, examples: Sequence[Example]) -> torch.Tensor:
        raise self._no_head("targets")

    def loss(self, outputs, targets, *, class_weight=None, label_smoothing=0.0) -> torch.Tensor:  # type: ignore[no-untyped-def]
        raise self._no_head("a head loss")

    def fit_baseline(self, x, y, *, examples, class_weight=None, seed=0):  # type: ignore[no-untyped-def]
        raise self._no_head("a linear probe (the baseline is the base model)")

    def metrics(self, outputs: torch.Tensor, examples: Sequence[Example]) -> dict[str, Any]:
        raise self._no_head("head metrics (the SFT trainer measures token loss)")

    def decode(self, row: torch.Tensor) -> dict[str, Any]:
        raise self._no_head("decoding a head output (generation decodes tokens)")

    def export_head(self, head: LinearHead) -> tuple[LinearHead, dict[str, Any]]:
        raise self._no_head("exporting a head")

    def output_tensors(self, predictions: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        raise self._no_head("Open Inference Protocol tensors")

    def profile(self, outputs: torch.Tensor) -> dict[str, Any]:
        """`outputs` [n, 1]: the token lengths of the reference rows' answers (generation has no
        head outputs; an answer's length is its output signal)."""
        lengths = [float(v) for v in outputs[:, 0].tolist()] if len(outputs) else []
        return {
            "output_length_edges": list(OUTPUT_LENGTH_EDGES),
            "output_length_histogram": histogram(lengths, OUTPUT_LENGTH_EDGES),
        }

    def drift_signals(
        self, reference: Mapping[str, Any], predictions: Sequence[Mapping[str, Any]]
    ) -> dict[str, dict[str, Any]]:
        """The length of live answers (`completion_tokens`) against the reference answers'. A
        client's `max_tokens` cuts answers short: that shows here, as it should."""
        if "output_length_histogram" not in reference:
            return {}
        edges = reference["output_length_edges"]
        current = histogram([p["completion_tokens"] for p in predictions], edges)
        return {"output_length": psi_signal(reference["output_length_histogram"], current,
                                            edges=edges)}  # fmt: skip
