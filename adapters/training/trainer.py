"""Train one adapter (LoRA + task head) on the shared frozen base, with honest validation.

The recipe (linear-probe-then-fine-tune):
1. pooled embeddings of every text from the frozen base, computed once;
2. a linear probe on them (the baseline, and the starting head);
3. LoRA on the chosen layers, starting exactly at the probe (B = 0), trained with AdamW, warm-up
   and linear decay, gradient clipping, per-batch padding over length-sorted buckets;
4. validation after every epoch (optionally every N steps), early stopping on validation loss
   with patience/min_delta, best weights restored;
5. the winner on validation (LoRA or the probe alone) is what gets served.

Everything task-specific (targets, loss, metrics, the decision metric) comes from the run's
`Task`; the trainer never looks at a task's name.
"""

from __future__ import annotations

import logging
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from loradock.adapters.core import lora
from loradock.adapters.core.base import BaseModel
from loradock.adapters.core.scheduling import PriorityGate
from loradock.adapters.core.tracing import tracer
from loradock.adapters.tasks.base import Task
from loradock.adapters.tasks.probe import LinearHead, fit_linear
from loradock.adapters.training.data import (
    SMALL_DATASET_ROWS,
    Dataset,
    Example,
    stratified_folds,
    stratified_split,
)
from loradock.adapters.training.encoding import Encoded, TrainingEncoder
from loradock.adapters.training.hyperparameters import Hyperparameters
from loradock.adapters.training.served import served_metrics

log = logging.getLogger(__name__)

StopReason = Literal["early_stopping", "max_epochs", "cancelled", "diverged", "budget"]


@dataclass
class TrainCallbacks:
    on_event: Callable[[dict[str, Any]], None] = lambda event: None
    should_cancel: Callable[[], bool] = lambda: False


@dataclass
class TrainOutcome:
    """Everything a finished (or stopped) job knows. `status` is succeeded, failed or cancelled."""

    status: str
    stop_reason: StopReason | None
    task: Task
    winner: Literal["lora", "probe", "base"] | None = None
    winner_reason: str = ""
    weights: lora.LoRAWeights | None = None
    head: LinearHead | None = None
    # Every run's epochs: one per fold (tagged `fold`), then the final fit (`final_fit`), or the
    # single run of a split.
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    baseline: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    # The reference profile's rows: texts the served model was validated on, and (for
    # cross-validation) the out-of-fold head outputs of the served kind of model on them.
    reference_texts: list[str] = field(default_factory=list)
    reference_outputs: torch.Tensor | None = None  # [n, n_outputs]
    error: str | None = None

    @property
    def labels(self) -> list[str]:
        return self.task.labels

    def served_metrics(self) -> dict[str, Any]:
        """Validation metrics of what is served: LoRA's, or the probe's when the probe won."""
        return served_metrics(self.metrics, self.baseline, self.winner)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


class Diverged(Exception):
    pass


class Cancelled(Exception):
    pass


def check_divergence(value: float, first: float | None, recent: list[float]) -> None:
    """Diverged when the loss is not finite or the last 10 steps average 10x the first."""
    if not math.isfinite(value):
        raise Diverged(f"training loss became {value}")
    recent.append(value)
    del recent[:-10]
    if first is not None and len(recent) == 10:
        limit = max(10 * first, first + 10)
        if statistics.fmean(recent) > limit:
            raise Diverged(
                "training loss exploded: mean of the last 10 steps "
                f"{statistics.fmean(recent):.3g} > {limit:.3g} "
                f"(10x the first step's loss {first:.3g})"
            )


def lora_param_groups(
    weights: lora.LoRAWeights, hp: Hyperparameters, b_ratio: float
) -> list[dict[str, Any]]:
    """AdamW groups: the A matrices at `learning_rate`, the B matrices at `b_ratio` times it (LoRA+,
    Hayou et al. 2024: B, which starts at zero, learns features faster at a higher rate)."""
    return [
        {"params": list(weights.A), "lr": hp.learning_rate},
        {"params": list(weights.B), "lr": hp.learning_rate * b_ratio},
    ]


def warmup_then_linear_decay(
    opt: torch.optim.Optimizer, total_steps: int, warmup_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup_ratio` of the steps, then linear decay to zero."""
    warmup = int(total_steps * warmup_ratio)

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)


def lora_spec(base: BaseModel, hp: Hyperparameters) -> tuple[lora.LoRASpec, list[str]]:
    """The LoRA shape `hp` asks for on `base`, and the full names of the layers it adapts."""
    targets = tuple(hp.target_modules or base.default_target_modules())
    n = base.num_layers
    layers: tuple[int, ...] | None
    if hp.trainable_layers is None:
        layers = None
    elif isinstance(hp.trainable_layers, int):
        k = min(max(hp.trainable_layers, 1), n)
        layers = tuple(range(n - k, n))
    else:
        bad = [i for i in hp.trainable_layers if not 0 <= i < n]
        if bad:
            raise ValueError(f"trainable_layers {bad} outside 0..{n - 1}")
        layers = tuple(sorted(set(hp.trainable_layers)))
    spec = lora.LoRASpec(hp.rank, hp.alpha, hp.dropout, targets, layers)
    linear = [t.name for t in base.linear_targets()]
    names = lora.select_targets(linear, targets, layers)
    if not names:
        raise ValueError(f"target_modules {list(targets)} match no Linear layer of the base")
    return spec, names


class Trainer:
    """Trains adapters on one BaseModel. Thread-safe as long as each run uses its own Trainer."""

    def __init__(self, base: BaseModel, gate: PriorityGate | None = None) -> None:
        self.base = base
        self.gate = gate or PriorityGate()
        self.device = base.device
        self.encoder = TrainingEncoder(base)

    # --- public --------------------------------------------------------------------------------

    def run(
        self,
        train: Dataset,
        hp: Hyperparameters,
        *,
        validation: Sequence[Example] | None = None,
        validation_split: float = 0.2,
        callbacks: TrainCallbacks | None = None,
    ) -> TrainOutcome:
        cb = callbacks or TrainCallbacks()
        started = time.perf_counter()
        task = train.task.from_dataset(train)
        out = TrainOutcome(status="running", stop_reason=None, task=task)
        report: dict[str, Any] = {"warnings": list(train.warnings), "rows": len(train.examples)}
        out.report = report
        try:
            examples = train.examples
            if validation is not None:
                splits = [(list(examples), list(validation))]
                report["validation"] = "given"
                final_on_all = False
            elif len(examples) < SMALL_DATASET_ROWS:
                k = train.task.cv_folds(train, hp.cv_folds)
                splits = stratified_folds(examples, train.task, k, hp.seed)
                report["validation"] = f"{k}-fold cross-validation"
                report["cross_validation"] = {
                    "folds": k,
                    "why": f"{len(examples)} rows < {SMALL_DATASET_ROWS}: every row is needed for "
                    "training, so k-fold cross-validation chose the epoch count and the final "
                    "model was trained on all rows; reported metrics are fold averages",
                }
                final_on_all = True
            else:
                tr, va = stratified_split(examples, train.task, validation_split, hp.seed)
                splits = [(tr, va)]
                report["validation"] = f"stratified split, {validation_split:.0%} held out"
                final_on_all = False

            texts = sorted({e.text for tr, va in splits for e in tr + va})
            embeddings = self._embed_all(texts, hp, report, cb)
            report["timings"] = {"embed_seconds": round(time.perf_counter() - started, 3)}

            fold_results = []
            for i, (tr, va) in enumerate(splits):
                tag = {"fold": i + 1} if final_on_all else {}
                if final_on_all:
                    cb.on_event({"type": "fold", "fold": i + 1, "folds": len(splits)})
                fold_results.append(self._fit_split(tr, va, hp, embeddings, out, cb, tag=tag))

            if final_on_all:
                self._finish_cv(train, hp, embeddings, fold_results, out, cb)
            else:
                res = fold_results[0]
                out.weights, out.head = res["lora"], res["head"]
                out.history, out.metrics, out.baseline = (
                    res["history"],
                    res["metrics"],
                    res["baseline"],
                )
                out.stop_reason = res["stop_reason"]
                out.reference_texts = [e.text for e in splits[0][1]]
                self._pick_winner(out, res["probe_head"], hp, len(splits[0][1]))
                self._calibrate(out, res["oof"][out.winner or "probe"], splits[0][1], hp)
                if out.winner == "probe" and validation is None:
                    self._refit_probe(out, splits[0][0] + splits[0][1], hp, embeddings)
                    out.reference_outputs = res["oof"]["probe"]  # out-of-sample, as with LoRA
            report["timings"]["total_seconds"] = round(time.perf_counter() - started, 3)
            out.status = "succeeded"
        except Cancelled:
            out.status, out.stop_reason = "cancelled", "cancelled"
            out.weights = out.head = None
        except Diverged as e:
            out.status, out.stop_reason, out.error = "failed", "diverged", str(e)
            out.weights = out.head = None
        return out

    # --- preparation ---------------------------------------------------------------------------

    def _embed_all(
        self, texts: Sequence[str], hp: Hyperparameters, report: dict[str, Any], cb: TrainCallbacks
    ) -> dict[str, torch.Tensor]:
        """Pooled frozen embeddings of every text (for the probe); when LoRA leaves the lower
        blocks frozen, the same pass caches what enters the first adapted block. A big dataset
        takes minutes here: cancelling stops it, and serving keeps its priority, per batch."""
        spec, _ = self._spec(hp)
        start = min(spec.layers) if spec.layers else 0

        def between() -> None:
            if cb.should_cancel():
                raise Cancelled()
            self.gate.yield_to_serving()

        return self.encoder.embed(texts, start, report, between)

    def _spec(self, hp: Hyperparameters) -> tuple[lora.LoRASpec, list[str]]:
        return lora_spec(self.base, hp)

    # --- one split -----------------------------------------------------------------------------

    def _fit_split(
        self,
        tr: Sequence[Example],
        va: Sequence[Example],
        hp: Hyperparameters,
        emb: dict[str, torch.Tensor],
        out: TrainOutcome,
        cb: TrainCallbacks,
        *,
        fixed_epochs: int | None = None,
        tag: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        task = out.task
        class_weight = task.class_weight(tr, hp.class_weights)
        t0 = time.perf_counter()
        x_tr = torch.stack([emb[e.text] for e in tr])
        y_tr = task.targets(tr)
        probe_head, baseline = task.fit_baseline(
            x_tr, y_tr, examples=tr, class_weight=class_weight, seed=hp.seed
        )
        baseline["seconds"] = round(time.perf_counter() - t0, 3)
        probe_outputs = None
        if va:
            probe_outputs = probe_head(torch.stack([emb[e.text] for e in va])).float().cpu()
            baseline.update(task.summary(task.metrics(probe_outputs, va)))
        cb.on_event({"type": "baseline", "baseline": baseline, **(tag or {})})
        if hp.serve == "probe":  # nothing to compare with: no LoRA is trained
            res: dict[str, Any] = {
                "lora": None, "head": probe_head, "history": [], "metrics": {},
                "stop_reason": "max_epochs", "best_epoch": 0,
            }  # fmt: skip
        else:
            init_head = fit_linear(x_tr, y_tr, task, l2=hp.init_head_l2, class_weight=class_weight)
            # LoRA starts at B = 0, i.e. at the frozen base: its first validation outputs are the
            # starting head on the embeddings already computed (no forward pass needed).
            start = init_head(torch.stack([emb[e.text] for e in va])).float() if va else None
            res = self._train_lora(
                tr, va, hp, init_head, out, cb, class_weight, fixed_epochs, tag or {}, start
            )
        res["baseline"] = baseline
        res["probe_head"] = probe_head
        res["oof"] = {"probe": probe_outputs, "lora": res.pop("val_outputs", None)}
        res["va"] = list(va)
        return res

    def _train_lora(
        self,
        tr: Sequence[Example],
        va: Sequence[Example],
        hp: Hyperparameters,
        probe_head: LinearHead,
        out: TrainOutcome,
        cb: TrainCallbacks,
        class_weight: torch.Tensor | None,
        fixed_epochs: int | None,
        tag: dict[str, Any],
        start_outputs: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        self._smoothing = hp.label_smoothing
        spec, names = self._spec(hp)
        lora.install(self.base.backbone, names)
        shapes = {
            t.name: (t.in_features, t.out_features)
            for t in self.base.linear_targets()
            if t.name in set(names)
        }
        gen = torch.Generator().manual_seed(hp.seed)
        weights = lora.LoRAWeights(spec, shapes, device=self.device, generator=gen)
        weights.seed_dropout(hp.seed)
        head = torch.nn.Linear(probe_head.weight.shape[1], probe_head.weight.shape[0])
        with torch.no_grad():
            head.weight.copy_(probe_head.weight)
            head.bias.copy_(probe_head.bias)
        head.to(self.device)
        cw = class_weight.to(self.device) if class_weight is not None else None

        epochs = fixed_epochs if fixed_epochs is not None else hp.epochs
        ids = self.encoder.encode(tr)
        y_tr = out.task.targets(tr)
        steps_per_epoch = math.ceil(len(tr) / hp.batch_size)
        total_steps = max(1, steps_per_epoch * epochs)
        head_lr = hp.head_learning_rate or hp.learning_rate
        lora_params = list(weights.parameters())
        opt = torch.optim.AdamW(
            [
                *lora_param_groups(weights, hp, hp.b_learning_rate_ratio_for(self.base.kind)),
                {"params": list(head.parameters()), "lr": head_lr},
            ],
            weight_decay=hp.weight_decay,
        )

        sched = warmup_then_linear_decay(opt, total_steps, hp.warmup_ratio)
        rng = random.Random(hp.seed)
        va_ids = self.encoder.encode(va) if va else Encoded(ids=[])

        history: list[dict[str, Any]] = []
        best: dict[str, Any] = {"loss": math.inf, "epoch": 0, "state": None, "metrics": None}
        if va:
            if start_outputs is not None:
                start_metrics = out.task.metrics(start_outputs, va)
            else:
                start_metrics, start_outputs = self._evaluate(weights, head, va, va_ids, out)
            best.update(loss=start_metrics["loss"], metrics=start_metrics, outputs=start_outputs)
            best["state"] = self._snapshot(weights, head)
        bad_evals = 0
        stop_reason: StopReason = "max_epochs"
        step = 0
        first_loss: float | None = None
        recent: list[float] = []
        stop = False
        epoch = 0
        for epoch in range(1, epochs + 1):
            weights.train()
            t_epoch = time.perf_counter()
            losses = []
            batches = self.encoder.batches(ids, hp.batch_size, rng)
            for i_batch, batch in enumerate(batches):
                if cb.should_cancel():
                    raise Cancelled()
                self.gate.yield_to_serving()
                with tracer.start_as_current_span(
                    "loradock.train_step",
                    attributes={"loradock.epoch": epoch, "loradock.step": step + 1},
                ):
                    loss = self._step(weights, head, ids, y_tr, batch, out, cw)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(
                        lora_params + list(head.parameters()), hp.max_grad_norm
                    )
                    opt.step()
                    sched.step()
                step += 1
                value = float(loss.detach())
                self._check_divergence(value, first_loss, recent)
                first_loss = value if first_loss is None else first_loss
                losses.append(value)
                cb.on_event(
                    {"type": "progress", "epoch": epoch, "epochs": epochs, "step": step,
                     "steps": total_steps, "loss": round(value, 5), **tag}
                )  # fmt: skip
                # (not at the epoch's last step: the end-of-epoch validation comes right after,
                # and the same weights evaluated twice would count once more against patience)
                last_of_epoch = i_batch == len(batches) - 1
                if (
                    va
                    and hp.eval_every_steps
                    and step % hp.eval_every_steps == 0
                    and not last_of_epoch
                ):
                    stop, bad_evals = self._validate(
                        weights, head, va, va_ids, out, hp, history, best, bad_evals,
                        epoch, step, statistics.fmean(losses), cb, tag, partial=True,
                    )  # fmt: skip
                    weights.train()
                    if stop:
                        stop_reason = "early_stopping"
                        break
            if stop:
                break
            train_loss = statistics.fmean(losses) if losses else float("nan")
            if va:
                stop, bad_evals = self._validate(
                    weights, head, va, va_ids, out, hp, history, best, bad_evals,
                    epoch, step, train_loss, cb, tag, seconds=time.perf_counter() - t_epoch,
                )  # fmt: skip
                if stop:
                    stop_reason = "early_stopping"
                    break
            else:
                record = {"epoch": epoch, "step": step, "train_loss": round(train_loss, 5), **tag}
                history.append(record)
                cb.on_event({"type": "epoch", **record})

        # With early stopping on, the best validated weights are restored. With it off, the
        # last epoch's weights are kept and reported: that is what turning it off means.
        restore = hp.early_stopping and va and best["state"] is not None
        if restore:
            self._restore(weights, head, best["state"])
        weights.eval()
        weights.requires_grad_(False)
        head.requires_grad_(False)
        if va and not hp.early_stopping and best.get("last_metrics") is not None:
            best.update(
                epoch=best["last_epoch"], metrics=best["last_metrics"], outputs=best["last_outputs"]
            )
        best_epoch = best["epoch"] if va else epoch
        metrics: dict[str, Any] = {
            "best_epoch": best_epoch,
            "stop_reason": stop_reason,
            "epochs_run": epoch,
            "steps": step,
            "trainable_parameters": sum(p.numel() for p in lora_params),
        }
        val_outputs = None
        if va and best["metrics"] is not None:
            metrics.update(out.task.summary(best["metrics"]))
            val_outputs = best[
                "outputs"
            ]  # of the weights kept, from the evaluation that chose them
            at_best = next(
                (h for h in history if h["epoch"] == best_epoch and not h.get("partial")), None
            )
            if at_best is not None:
                metrics["train_loss"] = at_best["train_loss"]
                metrics["generalization_gap"] = round(
                    at_best["val_loss"] - at_best["train_loss"], 5
                )
        head_out = LinearHead(weight=head.weight.detach().cpu(), bias=head.bias.detach().cpu())
        return {
            "lora": weights, "spec": spec, "head": head_out, "history": history,
            "metrics": metrics, "stop_reason": stop_reason, "best_epoch": best_epoch,
            "val_outputs": val_outputs,
        }  # fmt: skip

    def _validate(
        self, weights, head, va, va_ids, out, hp, history, best, bad_evals, epoch, step,
        train_loss, cb, tag, *, partial=False, seconds=None,
    ) -> tuple[bool, int]:  # fmt: skip
        m, outputs = self._evaluate(weights, head, va, va_ids, out)
        record: dict[str, Any] = {"epoch": epoch, "step": step, "train_loss": round(train_loss, 5)}
        record.update({k: v for k, v in out.task.summary(m).items() if k not in ("per_group",)})
        record.update(tag)
        if partial:
            record["partial"] = True
        if seconds is not None:
            record["seconds"] = round(seconds, 3)
        improved = m["loss"] < best["loss"] - hp.min_delta
        if not partial:
            best.update(last_epoch=epoch, last_metrics=m, last_outputs=outputs)
        if improved:
            best.update(
                loss=m["loss"], epoch=epoch, metrics=m, outputs=outputs,
                state=self._snapshot(weights, head),
            )  # fmt: skip
            bad_evals = 0
        else:
            bad_evals += 1
        record["best"] = improved
        history.append(record)
        cb.on_event({"type": "epoch" if not partial else "evaluation", **record})
        return hp.early_stopping and bad_evals >= hp.patience, bad_evals

    # --- mechanics -----------------------------------------------------------------------------

    def _step(self, weights, head, ids, y, rows, out, cw) -> torch.Tensor:
        outputs = self.encoder.forward(weights, head, ids, rows)
        target = y[rows].to(self.device)
        return out.task.loss(outputs, target, class_weight=cw, label_smoothing=self._smoothing)

    def _evaluate(self, weights, head, va, va_ids, out) -> tuple[dict[str, Any], torch.Tensor]:
        """(the task's metrics, head outputs [n, n_outputs]) on the validation rows."""
        outputs = self._outputs(weights, head, va, va_ids)
        return out.task.metrics(outputs, va), outputs

    @torch.inference_mode()
    def _outputs(self, weights, head, va, va_ids) -> torch.Tensor:
        """Head outputs [n, n_outputs] (float32, host) for validation rows, in their order."""
        was_training = weights.training
        weights.eval()
        order = sorted(range(len(va)), key=lambda i: len(va_ids.ids[i]))
        chunks = []
        for s in range(0, len(order), 64):
            chunks.append(
                self.encoder.forward(weights, head, va_ids, order[s : s + 64]).float().cpu()
            )
        outputs = torch.empty(len(va), chunks[0].shape[1])
        outputs[torch.tensor(order)] = torch.cat(chunks)
        weights.train(was_training)
        return outputs

    def _check_divergence(self, value: float, first: float | None, recent: list[float]) -> None:
        check_divergence(value, first, recent)

    @staticmethod
    def _snapshot(weights: lora.LoRAWeights, head: torch.nn.Module) -> dict[str, Any]:
        return {
            "lora": {k: v.detach().clone() for k, v in weights.state_dict().items()},
            "head": {k: v.detach().clone() for k, v in head.state_dict().items()},
        }

    @staticmethod
    def _restore(weights: lora.LoRAWeights, head: torch.nn.Module, state: dict[str, Any]) -> None:
        weights.load_state_dict(state["lora"])
        head.load_state_dict(state["head"])

    # --- finishing -----------------------------------------------------------------------------

    def _pick_winner(
        self, out: TrainOutcome, probe_head: LinearHead, hp: Hyperparameters, n_val: int
    ) -> None:
        """What the version serves: by default LoRA only when it beats the probe on the task's
        decision metric; a tie (within `tie_tolerance`, e.g. one validation text) goes to the
        lower validation loss. `serve` can ask for either one."""
        task = type(out.task)
        key = task.decision_metric
        lora_score, probe_score = out.metrics.get(key), out.baseline.get(key)
        scores = f"LoRA {_fmt(lora_score)}, linear probe {_fmt(probe_score)}"
        tolerance = task.tie_tolerance(n_val)
        if hp.serve == "probe" or out.weights is None:
            win, why = False, f"serve='probe': the linear probe alone ({key} {_fmt(probe_score)})"
        elif hp.serve == "lora":
            win, why = True, f"serve='lora' asked for LoRA ({key}: {scores})"
        elif lora_score is None or probe_score is None or out.metrics.get("best_epoch", 0) <= 0:
            win, why = False, f"LoRA never improved on its starting point ({key}: {scores})"
        elif abs(lora_score - probe_score) <= tolerance:
            lora_loss, probe_loss = out.metrics.get("val_loss"), out.baseline.get("val_loss")
            win = lora_loss is not None and (probe_loss is None or lora_loss < probe_loss)
            why = (
                f"{key} tied within {tolerance:.4f} (one of {n_val} validation "
                f"texts: {scores}); validation loss decides: LoRA {_fmt(lora_loss)}, "
                f"probe {_fmt(probe_loss)}"
            )
        else:
            win = task.better(out.metrics, out.baseline)
            why = f"{key}: {scores}"
        out.winner = "lora" if win else "probe"
        out.winner_reason = ("serving LoRA: " if win else "serving the linear probe (a head-only "
                             "adapter): ") + why  # fmt: skip
        if not win:
            out.weights = None
            out.head = probe_head
        if out.metrics.get("generalization_gap") is not None:
            out.report["generalization_gap"] = out.metrics.get("generalization_gap")

    def _refit_probe(
        self,
        out: TrainOutcome,
        rows: Sequence[Example],
        hp: Hyperparameters,
        emb: dict[str, torch.Tensor],
    ) -> None:
        """The chosen probe (its C) refit on every row before it is served: the validation rows
        have done their job once the choice is made. (LoRA keeps its validated weights: a refit
        would be an unvalidated model; with under SMALL_DATASET_ROWS rows, cross-validation
        already trains the final LoRA on all rows.)"""
        task = out.task
        x = torch.stack([emb[e.text] for e in rows])
        out.head = task.refit_baseline(
            x, task.targets(rows), out.baseline,
            class_weight=task.class_weight(rows, hp.class_weights),
        )  # fmt: skip
        out.report["probe_refit"] = (
            f"the linear probe (C={out.baseline.get('C')}) was refit on all {len(rows)} rows "
            "after it was chosen; its validation metrics are those of the fit on the training part"
        )

    def _finish_cv(
        self,
        train: Dataset,
        hp: Hyperparameters,
        emb: dict[str, torch.Tensor],
        folds: list[dict[str, Any]],
        out: TrainOutcome,
        cb: TrainCallbacks,
    ) -> None:
        """Average the folds, then train on every row for the median best epoch count.

        The reference profile pairs the final model's embeddings of every row with the
        out-of-fold outputs of the winning kind of model (in-sample outputs would be
        overconfident), so drift monitoring works for small datasets too.
        """
        best_epochs = [f["best_epoch"] for f in folds]
        epochs = int(statistics.median(best_epochs))
        out.report["cross_validation"]["best_epochs"] = best_epochs
        out.report["cross_validation"]["chosen_epochs"] = epochs

        def mean_of(key: str, source: str) -> float | None:
            vals = [f[source].get(key) for f in folds if f[source].get(key) is not None]
            return round(statistics.fmean(vals), 5) if vals else None

        keys = sorted(
            {k for f in folds for src in ("metrics", "baseline") for k in f[src]
             if k.startswith("val_")}
        )  # fmt: skip
        out.metrics = {k: v for k in keys if (v := mean_of(k, "metrics")) is not None}
        out.baseline = {k: v for k in keys if (v := mean_of(k, "baseline")) is not None}
        out.baseline.update(
            {k: v for k, v in folds[-1]["baseline"].items() if not k.startswith(("val_", "cv_"))}
        )
        all_rows = train.examples
        cb.on_event({"type": "final_fit", "epochs": max(1, epochs), "folds": len(folds)})
        final = self._fit_split(
            all_rows, [], hp, emb, out, cb, fixed_epochs=max(1, epochs), tag={"final_fit": True}
        )
        out.history = [h for f in folds for h in f["history"]] + final["history"]
        out.metrics.update(
            {"best_epoch": epochs, "stop_reason": "max_epochs", "epochs_run": max(1, epochs),
             "steps": final["metrics"].get("steps", 0),
             "trainable_parameters": final["metrics"].get("trainable_parameters", 0)}
        )  # fmt: skip
        out.stop_reason = "early_stopping" if epochs < hp.epochs else "max_epochs"
        out.metrics["stop_reason"] = out.stop_reason
        out.weights, out.head = final["lora"], final["head"]
        if epochs == 0 and hp.serve == "best":
            out.weights = None  # no epoch helped in any fold: the probe is served
        self._pick_winner(out, final["probe_head"], hp, len(all_rows))
        kind = out.winner or "probe"
        rows: list[Example] = []
        outputs: list[torch.Tensor] = []
        for f in folds:
            oof = f["oof"][kind] if f["oof"][kind] is not None else f["oof"]["probe"]
            if oof is not None:
                rows += f["va"]
                outputs.append(oof)
        out.reference_texts = [e.text for e in rows]
        out.reference_outputs = torch.cat(outputs) if outputs else None
        self._calibrate(out, out.reference_outputs, rows, hp)

    @staticmethod
    def _calibrate(
        out: TrainOutcome,
        outputs: torch.Tensor | None,
        rows: Sequence[Example],
        hp: Hyperparameters,
    ) -> None:
        """The task's serving-time settings (multi-label thresholds) from the served kind of
        model's out-of-sample outputs; the validation metrics stay those at the defaults, which
        is what the winner and promotion decisions compared."""
        if outputs is None or not rows:
            return
        done = out.task.calibrate(outputs, rows, seed=hp.seed)
        if done:
            out.report["calibration"] = done
