"""Following a training job: de-duplicating its event stream, and a progress bar for terminals."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TextIO

from loradock_client.models import KEEP_ALIVE, Job, JobEvent, JobProgress
from loradock_client.render import epoch_line, num

EventHook = Callable[[JobEvent], None]


class JobWatch:
    """The state of following one job over one or more event-stream connections.

    Epochs carry event ids: a new connection sends the last one (`last_event_id`) and the server
    resumes after it; an epoch whose id was already seen is skipped. Servers without ids replay
    the job's history on reconnect: those epochs are skipped when they match, in order, what was
    passed on. A repeated status or progress is skipped too. `final` is the job of the `end`
    event; `deleted` is set when the job's adapter was deleted meanwhile.
    """

    def __init__(self, job_id: str, hooks: list[EventHook]) -> None:
        self.job_id = job_id
        self.hooks = hooks
        self.final: Job | None = None
        self.deleted = False
        self._run: list[tuple[Any, ...]] = []  # epochs passed on since the count last restarted
        self._replay: int | None = None  # position in a reconnection's replay of _run
        self._status: str | None = None
        self._progress: dict[str, Any] | None = None
        self._ids: set[str] = set()
        self.last_event_id: str | None = None

    @property
    def ended(self) -> bool:
        return self.final is not None or self.deleted

    def new_connection(self) -> None:
        self._replay = 0

    def accept(self, event: JobEvent) -> bool:
        """Pass the event on unless it repeats what was passed already. True if it was news:
        passed on, or a keep-alive (never passed on: it only shows the stream is alive)."""
        data = event.data
        if event.event == KEEP_ALIVE:  # the stream is alive: news enough to keep following
            return True
        if event.event == "epoch" and event.id is not None:
            if event.id in self._ids:
                return False
            self._ids.add(event.id)
            self.last_event_id = event.id
        elif event.event == "epoch":
            key = tuple(
                data.get(k)
                for k in ("fold", "final_fit", "epoch", "step", "train_loss", "val_loss")
            )
            if self._replay is not None:
                if self._replay < len(self._run) and self._run[self._replay] == key:
                    self._replay += 1
                    return False
                self._replay = None
            if self._run and (key[:2] != self._run[-1][:2] or _before(key[2], self._run[-1][2])):
                self._run = []  # a new cross-validation fold, or the final fit
            self._run.append(key)
        elif event.event == "status":
            if data.get("status") == self._status:
                return False
            self._status = data.get("status")
        elif event.event == "progress":
            if data == self._progress:
                return False
            self._progress = data
        elif event.event == "end":
            if "adapter_id" in data:
                self.final = Job.model_validate(data)
            else:
                self.deleted = True
        for hook in self.hooks:
            hook(event)
        return True


def _before(epoch: Any, previous: Any) -> bool:
    """The epoch count restarted (`epoch` is not after `previous`)."""
    numbers = isinstance(epoch, int | float) and isinstance(previous, int | float)
    return numbers and epoch <= previous


def in_notebook() -> bool:
    """True inside a Jupyter (ZMQ) kernel, where stderr is not a terminal but a cell output."""
    ipython = sys.modules.get("IPython")
    get = getattr(ipython, "get_ipython", None)
    shell = get() if get is not None else None
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


class ProgressDisplay:
    """A one-line progress bar redrawn in place on `stream` (stderr by default), or in a
    notebook an output line updated in place (IPython's display handles, no extra package).

    Enabled only when the stream is a terminal or the code runs in a notebook, unless `enabled`
    says otherwise. With `echo_epochs`, each validation is printed as a line above the bar.
    `echo()` prints a line of the caller's (on any stream) without tearing the bar.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        enabled: bool | None = None,
        echo_epochs: bool = True,
        label: str = "training",
        bar_width: int = 24,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        terminal = bool(isatty and isatty())
        # A notebook cell: no carriage returns, one display output updated in place.
        self.notebook = stream is None and not terminal and in_notebook()
        if enabled is None:
            enabled = terminal or self.notebook
        self.enabled = enabled
        self._handle: Any = None
        self.echo_epochs = echo_epochs
        self.label = label
        self.bar_width = bar_width
        self.status = "queued"
        self.progress = JobProgress()
        self.last_val_loss: float | None = None
        self._drawn = False

    def __call__(self, event: JobEvent) -> None:
        if event.event == "status":
            self.status = str(event.data.get("status", self.status))
        elif event.event == "progress":
            self.progress = JobProgress.model_validate(event.data)
        elif event.event == "epoch":
            self.last_val_loss = event.data.get("val_loss", self.last_val_loss)
            if self.echo_epochs:
                self.echo(epoch_line(event.data))
        elif event.event == "end":
            self.status = str(event.data.get("status", self.status))
            self.clear()
            return
        self.draw()

    def line(self) -> str:
        p = self.progress
        frac = p.fraction
        filled = round((frac or 0.0) * self.bar_width)
        bar = "#" * filled + "-" * (self.bar_width - filled)
        parts = [f"{self.label} [{bar}] {frac:4.0%}" if frac is not None else f"{self.label}"]
        parts.append(self.status)
        if p.final_fit:
            parts.append("final fit")
        elif p.folds and p.folds > 1:
            parts.append(f"fold {p.fold}/{p.folds}")
        if p.epoch is not None:
            parts.append(f"epoch {num(p.epoch)}/{p.epochs or '?'}")
        if p.step is not None:
            parts.append(f"step {p.step}/{p.steps or '?'}")
        if p.loss is not None:
            parts.append(f"loss {num(p.loss)}")
        if self.last_val_loss is not None:
            parts.append(f"val_loss {num(self.last_val_loss)}")
        return "  ".join(parts)

    def draw(self) -> None:
        if not self.enabled:
            return
        if self.notebook:
            self._show(self.line())
            return
        self.stream.write("\r\x1b[2K" + self.line())
        self.stream.flush()
        self._drawn = True

    def _show(self, text: str) -> None:
        from IPython.display import display  # present: this is a notebook

        if self._handle is None:
            self._handle = display({"text/plain": text}, raw=True, display_id=True)
        else:
            self._handle.update({"text/plain": text}, raw=True)

    def clear(self) -> None:
        if self.notebook:
            return  # the last state stays visible in the cell
        if self.enabled and self._drawn:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self._drawn = False

    def echo(self, text: str, stream: TextIO | None = None) -> None:
        """Print a line above the bar (the bar is redrawn after it). Disabled: only to `stream`."""
        out = stream if stream is not None else self.stream
        if not self.enabled and stream is None:
            return
        if self.notebook and stream is None:  # a cell: lines print above the updated bar
            print(text, file=out, flush=True)
            return
        redraw = self._drawn
        self.clear()
        out.write(text + "\n")
        out.flush()
        if redraw:
            self.draw()

    def close(self) -> None:
        self.clear()


def make_display(progress: bool | ProgressDisplay | None) -> ProgressDisplay:
    """`progress` as a display: one given, or a bar on stderr (None: when it is a terminal)."""
    if isinstance(progress, ProgressDisplay):
        return progress
    return ProgressDisplay(enabled=progress)
