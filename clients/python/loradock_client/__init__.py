"""Python client of the loradock service: `Client` (sync) and `AsyncClient`, typed models, errors.

from loradock_client import Client

with Client() as client:  # $LORADOCK_URL (default http://127.0.0.1:8000), $LORADOCK_API_KEY
    trained = client.adapters.create("tickets", training_data=rows)
    print(trained.summary())
    print(client.predict("tickets", ["my card was charged twice"]).labels)
"""

from loradock_client._transport import RetryEvent, RetryPolicy
from loradock_client._version import __version__
from loradock_client.aio import AsyncClient
from loradock_client.client import Client
from loradock_client.errors import (
    APIError,
    AuthenticationError,
    BadRequest,
    Conflict,
    ConnectionFailed,
    JobFailed,
    LoradockError,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    RateLimited,
    ServerError,
    ServerUnavailable,
    StreamInterrupted,
    TrainingFailed,
    ValidationFailed,
)
from loradock_client.models import (
    Adapter,
    Baseline,
    BatchSubmission,
    EpochRecord,
    FeedbackResult,
    Identity,
    Job,
    JobEvent,
    JobProgress,
    Key,
    MonitoringReport,
    Prediction,
    PredictionResult,
    Tenant,
    TrainingResult,
    Version,
    VersionMetrics,
)
from loradock_client.progress import ProgressDisplay

__all__ = [
    "APIError",
    "Adapter",
    "AsyncClient",
    "AuthenticationError",
    "BadRequest",
    "Baseline",
    "BatchSubmission",
    "Client",
    "Conflict",
    "ConnectionFailed",
    "EpochRecord",
    "FeedbackResult",
    "Identity",
    "Job",
    "JobEvent",
    "JobFailed",
    "JobProgress",
    "Key",
    "LoradockError",
    "MonitoringReport",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "Prediction",
    "PredictionResult",
    "ProgressDisplay",
    "RateLimited",
    "RetryEvent",
    "RetryPolicy",
    "ServerError",
    "ServerUnavailable",
    "StreamInterrupted",
    "Tenant",
    "TrainingFailed",
    "TrainingResult",
    "ValidationFailed",
    "Version",
    "VersionMetrics",
    "__version__",
]
