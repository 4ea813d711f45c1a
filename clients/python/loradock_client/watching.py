"""The parts of following a training job that do not depend on sync or async I/O."""

from __future__ import annotations

from loradock_client._transport import RetryPolicy
from loradock_client.errors import ConnectionFailed, NotFound, StreamInterrupted, TrainingFailed
from loradock_client.models import Adapter, Job, TrainingResult
from loradock_client.progress import JobWatch


def reconnect_delay(
    policy: RetryPolicy, job_id: str, breaks: int, error: StreamInterrupted | None
) -> float:
    """Seconds before reconnecting after the `breaks`-th stream in a row that ended without the
    job ending and without news; raises once `policy.max_attempts` such streams ended."""
    if breaks >= policy.max_attempts:
        if error is not None:
            raise error
        raise ConnectionFailed(
            f"the event stream of job {job_id} closed {breaks} times before the job ended"
        )
    return policy.backoff_delay(breaks)


def watch_result(state: JobWatch) -> Job:
    if state.final is None:
        raise NotFound(
            f"job {state.job_id} is gone: its adapter was deleted while it was followed",
            status=404,
        )
    return state.final


def finish_training(adapter: Adapter, job: Job) -> TrainingResult:
    """The result of a followed training job; TrainingFailed unless it succeeded."""
    result = TrainingResult(adapter=adapter, job=job)
    if job.status != "succeeded":
        why = job.error or (f"stop reason {job.stop_reason}" if job.stop_reason else job.status)
        raise TrainingFailed(
            f"training of {adapter.name!r} version {job.version} {job.status}: {why}", result
        )
    return result
