"""Job event streams: SSE decoding, watching with reconnects, the progress bar."""

import asyncio
import io

import pytest
from loradock_client import (
    AsyncClient,
    Client,
    ConnectionFailed,
    JobEvent,
    NotFound,
    ProgressDisplay,
    RetryPolicy,
)
from loradock_client._transport import decode_sse

from tests.clients import samples
from tests.clients.fake_server import FakeServer, Reply

EVENTS = "/v1/jobs/job_1/events"
FAST = RetryPolicy(max_attempts=3, backoff=0.01)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_sse_decoding_follows_the_event_stream_rules():
    lines = [
        ": a comment",
        "event: epoch",
        'data: {"epoch": 1,',
        'data:  "val_loss": 0.5}',
        "id: 7",
        "",
        "",
        "data: [1, 2]",
        "",
        "event: end",
        "data: not json",
        "",
        "event: dangling",
    ]
    assert list(decode_sse(lines)) == [  # the last event id persists until a new one
        JobEvent("keep-alive", {"comment": "a comment"}),  # a comment: the stream is alive
        JobEvent("epoch", {"epoch": 1, "val_loss": 0.5}, "7"),
        JobEvent("message", {"value": [1, 2]}, "7"),
        JobEvent("end", {"raw": "not json"}, "7"),
    ]


def test_watch_reconnects_after_a_broken_stream_and_passes_each_epoch_once():
    first = samples.job_events()[:3]  # status, progress, epoch 1 ... then the connection breaks
    with FakeServer() as server:
        server.on(
            "GET",
            EVENTS,
            Reply(events=first, break_stream=True),
            Reply(events=samples.job_events()),
        )
        seen: list[JobEvent] = []
        retries = []
        with Client(server.url, "k", retry=FAST, on_retry=retries.append) as client:
            job = client.jobs.watch("job_1", on_event=seen.append, progress=False)
    assert job.status == "succeeded"
    assert job.stop_reason == "early_stopping"
    assert len(server.hits("GET", EVENTS)) == 2
    assert [e.data["epoch"] for e in seen if e.event == "epoch"] == [1, 2, 3]
    assert [e.data["status"] for e in seen if e.event == "status"] == ["running", "succeeded"]
    assert seen[-1].event == "end"
    assert "broke" in retries[0].reason


def test_watch_gives_up_when_streams_keep_ending_without_news():
    quiet = samples.job_events()[:2]
    with FakeServer() as server:
        server.on("GET", EVENTS, Reply(events=quiet))
        with (
            Client(server.url, "k", retry=FAST) as client,
            pytest.raises(ConnectionFailed, match="closed 3 times"),
        ):
            client.jobs.watch("job_1", progress=False)
    assert len(server.hits("GET", EVENTS)) == 3


def test_watch_keeps_following_a_waiting_job_whose_streams_carry_keep_alives():
    """A queued job's stream cut by a proxy (no news, but keep-alives) is not a failing server:
    the client reconnects as long as it takes, then returns the finished job."""
    waiting = [*samples.job_events()[:1], (":", {}), (":", {})]  # status queued, keep-alives
    with FakeServer() as server:
        server.on(
            "GET", EVENTS, *[Reply(events=waiting) for _ in range(6)],
            Reply(events=samples.job_events()),
        )  # fmt: skip
        with Client(server.url, "k", retry=FAST) as client:
            job = client.jobs.watch("job_1", progress=False)
    assert job.status == "succeeded"
    assert len(server.hits("GET", EVENTS)) == 7  # more than max_attempts quiet streams


def test_watch_of_a_job_whose_adapter_was_deleted_raises_not_found():
    with FakeServer() as server:
        server.on("GET", EVENTS, Reply(events=[("end", {"id": "job_1", "status": "deleted"})]))
        server.on("GET", "/v1/jobs/job_2/events", Reply(404, {"detail": "job 'job_2' not found"}))
        with Client(server.url, "k", retry=FAST) as client:
            with pytest.raises(NotFound, match="deleted"):
                client.jobs.watch("job_1", progress=False)
            with pytest.raises(NotFound, match="job_2"):
                client.jobs.watch("job_2", progress=False)


def test_the_progress_bar_is_drawn_on_a_terminal_only(capsys):
    with FakeServer() as server:
        server.on("GET", EVENTS, Reply(events=samples.job_events()))
        terminal = Terminal()
        with Client(server.url, "k") as client:
            client.jobs.watch("job_1", progress=ProgressDisplay(terminal))
            client.jobs.watch("job_1")  # default: stderr, which is not a terminal here
    drawn = terminal.getvalue()
    assert "\r\x1b[2K" in drawn
    assert "training [#-----------------------]   5%  running  epoch 1/20  step 2/40" in drawn
    assert (
        "epoch 2  train_loss 0.5000  val_loss 0.6000  val_acc 0.8000  val_f1 0.7900  *best" in drawn
    )
    assert drawn.endswith("\r\x1b[2K")  # the bar is cleared at the end
    assert capsys.readouterr().err == ""


def test_events_can_be_read_one_by_one():
    with FakeServer() as server:
        server.on("GET", EVENTS, Reply(events=samples.job_events()))
        with Client(server.url, "k") as client:
            names = [e.event for e in client.jobs.events("job_1")]
    assert names == ["status", "progress", "epoch", "progress", "epoch", "epoch", "status", "end"]
    assert server.hits("GET", EVENTS)[0].headers["accept"] == "text/event-stream"


def test_async_client_creates_and_watches():
    started = {
        "adapter": samples.adapter(live=None, status="training"),
        "job": samples.job("queued"),
    }

    async def run(url: str):
        seen: list[JobEvent] = []
        async with AsyncClient(url, "k", retry=FAST) as client:
            result = await client.adapters.create(
                "tickets", training_data=[{"text": "a", "label": "b"}], on_event=seen.append
            )
            names = [e.event async for e in client.jobs.events("job_1")]
        return result, seen, names

    with FakeServer() as server:
        server.on("POST", "/v1/adapters", Reply(202, started))
        server.on(
            "GET",
            EVENTS,
            Reply(events=samples.job_events()[:4], break_stream=True),
            Reply(events=samples.job_events()),
        )
        server.on("GET", "/v1/adapters/ad_1", Reply(200, samples.adapter()))
        result, seen, names = asyncio.run(run(server.url))
    assert result.job.status == "succeeded"
    assert result.adapter.live_version == 1
    assert [e.data["epoch"] for e in seen if e.event == "epoch"] == [1, 2, 3]
    assert names[-1] == "end"


def test_a_reconnect_during_cross_validation_replays_only_the_current_fold():
    def ep(n, loss):
        return ("epoch", {"epoch": n, "train_loss": loss})

    fold1 = [ep(1, 0.9), ep(2, 0.8)]
    first = [("status", {"status": "running"}), *fold1, ep(1, 0.7)]  # fold 2 began, then a break
    second = [("status", {"status": "running"}), ep(1, 0.7), ep(2, 0.6), ("end", samples.job())]
    with FakeServer() as server:
        server.on("GET", EVENTS, Reply(events=first, break_stream=True), Reply(events=second))
        seen: list[JobEvent] = []
        with Client(server.url, "k", retry=FAST) as client:
            client.jobs.watch("job_1", on_event=seen.append, progress=False)
    losses = [e.data["train_loss"] for e in seen if e.event == "epoch"]
    assert losses == [0.9, 0.8, 0.7, 0.6]
