"""Every knob of the gateway, from flags, ``BASTION_*`` environment variables and a config file.

Precedence (highest first): explicit keyword arguments (the CLI's flags), environment, the TOML/JSON
file named by ``BASTION_CONFIG_FILE``, defaults.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from bastion import models

DEFAULT_REPOSITORY = Path(models.__file__).parent / "repository"
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")  # RFC 9110 §5.6.2 token, lower case
# read by the CLI, the scripts and the benchmarks, not by Settings
OTHER_VARIABLES = frozenset(
    {
        "BASTION_CONFIG_FILE",
        "BASTION_URL",
        "BASTION_VENV",
        "BASTION_PEERS_DIR",
        "BASTION_PYTHON",  # scripts/cluster.sh's, passed through to the replicas it starts
        "BASTION_CLUSTER_DIR",
        "BASTION_CLUSTER_ENV",
        "BASTION_CLUSTER_REPLICAS",
        "BASTION_TEST_ARTIFACTS",
    }
)


class Settings(BaseSettings):
    """Gateway settings. Units are in the names: ``_us`` microseconds, ``_s`` seconds."""

    model_config = SettingsConfigDict(env_prefix="BASTION_", extra="forbid")

    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port.")
    allow_grpc: bool = Field(True, description="Serve KServe v2 gRPC (Triton's) beside HTTP.")
    grpc_port: int = Field(8001, ge=0, le=65535, description="gRPC port (0: any free port).")
    grpc_max_concurrent_rpcs: int = Field(
        1024,
        ge=1,
        description="gRPC calls open at once, counted from their headers (the health check "
        "excepted); past it UNAVAILABLE.",
    )
    grpc_max_concurrent_streams: int = Field(
        256, ge=1, description="HTTP/2 streams (calls) one gRPC connection may have open."
    )
    grpc_stream_window: int = Field(
        64, ge=1, description="Requests of one ModelStreamInfer stream answered at once."
    )
    grpc_stream_idle_timeout_s: float = Field(
        60.0,
        gt=0,
        description="A ModelStreamInfer stream that sends no request for this long is ended "
        "(DEADLINE_EXCEEDED), freeing its call slot; its first request has the body timeout.",
    )
    grpc_infer_response_compression: Literal["none", "gzip", "deflate"] = Field(
        "none", description="Compression of gRPC responses (for clients that accept it)."
    )
    model_repository: Path = Field(DEFAULT_REPOSITORY, description="Triton-style model repository.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto picks CUDA when present."
    )
    torch_threads: int = Field(
        0, ge=0, description="torch intra-op threads; 0 leaves torch's default."
    )
    max_body_bytes: int = Field(64 << 20, gt=0, description="Largest accepted request body.")
    max_json_bytes: int = Field(16 << 20, gt=0, description="Largest JSON header of a request.")
    max_elements: int = Field(
        1 << 26, gt=0, description="Largest element count of one input tensor."
    )
    max_image_bytes: int = Field(8 << 20, gt=0, description="Largest encoded PNG/JPEG image.")
    max_image_pixels: int = Field(
        4096 * 4096, gt=0, description="Largest decoded image, in pixels."
    )
    max_queue_size: int = Field(
        0, ge=0, description="Queue bound per model in requests; 0 uses each model's config."
    )
    default_timeout_us: int = Field(
        0, ge=0, description="Deadline for a request with none of its own; 0 means none."
    )
    max_concurrent_batches: int = Field(
        1, ge=1, description="Batches in flight per device (one compute thread each)."
    )
    # a model with backend "triton" (backends/triton_upstream.py); its config's parameters
    # upstream_timeout_s and upstream_connections override the first two for it
    upstream_timeout_s: float = Field(
        10.0, gt=0, le=3600, description="One call to a remote Triton upstream, in seconds."
    )
    upstream_connections: int = Field(
        16, ge=1, le=1024, description="HTTP connections kept to each remote Triton upstream."
    )
    upstream_max_inflight_batches: int = Field(
        0,
        ge=0,
        le=1024,
        description="Batches in flight to each remote Triton upstream; 0: as many as the "
        "upstream model has instances (its instance_group counts, read at load; 1 if unknown).",
    )
    upstream_max_response_bytes: int = Field(
        64 << 20,
        ge=1 << 16,
        le=1 << 31,
        description="Largest answer taken from a remote Triton upstream; a model whose outputs "
        "have fixed dims gets a tighter bound from them.",
    )
    upstream_health_interval_s: float = Field(
        2.0, gt=0, le=3600, description="How often an upstream's readiness is checked, seconds."
    )
    admin_token: str = Field("", description="Bearer token for admin actions; empty disables them.")
    client_id_header: str = Field(
        "x-client-id", description="Request header naming the client (lower case)."
    )
    quarantine_path: Path = Field(
        Path.home() / ".local" / "share" / "bastion" / "quarantine.db",
        description="SQLite file of the quarantine store.",
    )
    drift: bool = Field(
        True, description="Monitor drift for models whose version has a reference profile."
    )
    drift_hop_images: int = Field(
        250, ge=10, description="Images per hop; the sliding window is evaluated at every hop."
    )
    drift_window_hops: int = Field(2, ge=1, description="Hops in a drift window.")
    drift_hop_max_s: float = Field(
        60.0, gt=0, description="A hop also closes after this many seconds (windows by time)."
    )
    drift_min_images: int = Field(
        400, ge=1, description="A window with fewer images is not scored (too noisy)."
    )
    drift_psi_threshold: float = Field(0.15, gt=0, description="PSI alarm threshold.")
    drift_js_threshold: float = Field(
        0.05, gt=0, description="Jensen-Shannon (nats) alarm threshold for the class mix."
    )
    drift_flag_z_threshold: float = Field(
        5.0, gt=0, description="Alarm when the flag rate is this many binomial sds above its rate."
    )
    drift_mmd_alpha: float = Field(
        0.001, gt=0, lt=1, description="MMD p-value alarm level (two disjoint windows in a row)."
    )
    drift_mmd_permutations: int = Field(1000, ge=10, description="Permutations per MMD test.")
    drift_mmd_interval_s: float = Field(
        5.0, ge=0, description="Least time between two MMD tests (they run off the hot path)."
    )
    drift_embedding_sample: int = Field(
        256, ge=20, description="Embeddings per window compared with the reference by MMD."
    )
    dashboard_interval_s: float = Field(
        1.0, gt=0, description="How often the built-in dashboard's history is sampled."
    )
    # -- the front door: HTTP limits (answered 431, 408, 503) --------------------------------
    http_max_header_bytes: int = Field(
        32 << 10,
        ge=1024,
        description="Largest request head (request line and headers), bytes: 431.",
    )
    http_max_headers: int = Field(100, ge=8, description="Most header fields in a request: 431.")
    http_header_timeout_s: float = Field(
        10.0, gt=0, description="Time from a request's first byte to the end of its head: 408."
    )
    http_body_timeout_s: float = Field(
        30.0, gt=0, description="Time from the end of a request's head to its last body byte: 408."
    )
    http_keepalive_timeout_s: float = Field(
        5.0, gt=0, description="An idle connection (also a new one that sends nothing) is closed."
    )
    http_write_timeout_s: float = Field(
        30.0, gt=0, description="A response the client does not read for this long: dropped."
    )
    http_max_connections: int = Field(
        2048,
        ge=1,
        description="Open connections; a new one past it gets 503 and is closed "
        "(capped below the process's file-descriptor limit).",
    )
    max_control_body_bytes: int = Field(
        128 << 10, ge=1024, description="Largest body of a route other than inference: 413."
    )
    max_requests_in_flight: int = Field(
        1024, ge=1, description="Requests being handled at once (health checks excepted): 503."
    )
    # -- the front door: untrusted bytes are parsed in a bounded pool, never on the event loop --
    decode_workers: int = Field(
        2, ge=1, description="Threads that decompress, parse and decode request bodies."
    )
    decode_queue_size: int = Field(
        256, ge=1, description="Requests waiting for a decode thread; past it: 503 at once."
    )
    decode_budget_ms: int = Field(
        2000, ge=1, description="Decode time one request may use before it is refused (413)."
    )
    max_client_id_chars: int = Field(
        128,
        ge=1,
        le=1024,
        description="Longest client identity header (charset: letters, digits and ._~:@/+=-): 400.",
    )
    max_request_id_chars: int = Field(256, ge=1, le=4096, description="Longest request id: 400.")
    # -- what a public route may show --------------------------------------------------------
    metrics_token: str = Field(
        "",
        description="Bearer token for /metrics; empty leaves /metrics public (it never "
        "shows thresholds; per-detector score histograms appear only when a token is set).",
    )
    # -- the quarantine store: quotas and retention -------------------------------------------
    quarantine_max_records: int = Field(
        100_000, ge=1, description="Records kept in all; past it new ones are dropped (counted)."
    )
    quarantine_max_records_per_client: int = Field(
        1_000, ge=1, description="Records kept per client id; past it new ones are dropped."
    )
    quarantine_max_bytes: int = Field(
        1 << 30, ge=1 << 20, description="Stored input bytes in all; past it new ones are dropped."
    )
    quarantine_retention_s: float = Field(
        30 * 86400.0, gt=0, description="Records older than this are deleted."
    )
    quarantine_retention_interval_s: float = Field(
        600.0, gt=0, description="How often the retention sweep runs."
    )
    redis_url: str | None = Field(
        None,
        max_length=2048,
        description="redis://host:port/db where replicas share hot state (the per-client rate "
        "limit, the stateful defence's evidence stream and fingerprint salt, the route table, "
        "throttled campaigns); unset: in this process. Put a password in the URL through the "
        "environment (BASTION_REDIS_URL), not on the command line.",
    )
    shared_state_timeout_s: float = Field(
        0.25, gt=0, le=30, description="How long one Redis command may take before it fails."
    )
    shared_state_failure: Literal["open", "closed"] = Field(
        "open",
        description="When Redis does not answer: open serves without the shared state "
        "(counted in bastion_shared_state_errors_total); closed refuses with 503 and reports "
        "the gateway not ready.",
    )
    rate_limit: float = Field(
        0.0,
        ge=0,
        le=1e7,
        description="Requests a minute each client may send (0: no limit); over it, 429 with "
        "Retry-After. Shared by every replica when BASTION_REDIS_URL is set.",
    )
    rate_limit_burst: int = Field(
        10,
        ge=1,
        le=100_000,
        description="Requests one client identity (its key, X-Client-ID, else its peer address) "
        "may send at once within its limit; the limit counts requests, not images.",
    )
    database_url: str | None = Field(
        None,
        max_length=2048,
        pattern=r"^postgres(ql)?://",
        description="PostgreSQL for the state replicas share (client keys, the quarantine and "
        "review store, the incident log and its incidents, the served-prediction ledger), e.g. "
        "postgresql://bastion@db:5432/bastion; unset: SQLite files. Give the password in the "
        "environment (BASTION_DATABASE_URL) or PGPASSWORD, not on the command line.",
    )
    keys_path: Path = Field(
        Path.home() / ".local" / "share" / "bastion" / "keys.db",
        description="SQLite file of client API keys (hashed). Once it holds an active key, "
        "every inference request needs 'Authorization: Bearer <key>' (else 401).",
    )
    keys_refresh_s: float = Field(
        1.0, gt=0, le=60, description="How often a gateway re-reads the keys (revocations)."
    )
    trust_client_header: bool = Field(
        False,
        description="With keys configured, believe the client id header instead (behind a proxy "
        "that authenticates clients and sets it); a request without the header gets 401.",
    )
    # -- the stateful defence against query-based attacks (gateway/defence) -------------------
    defence: bool = Field(
        True,
        description="Fingerprint every screened query, link near-duplicates across clients, "
        "and contain clients and campaigns whose evidence passes the ladder's thresholds "
        "(on by default: benchmarks/incident.py measures it beside honest traffic).",
    )
    fingerprint_salt: int | None = Field(
        None,
        ge=0,
        description="Secret salt of the query fingerprints; unset: random per process, or with "
        "BASTION_REDIS_URL the one the first replica put in Redis (set it, the same on every "
        "replica, where Redis may lose its data: a new salt would split the replicas).",
    )
    probe_capacity: int = Field(
        100_000, ge=1, le=10_000_000, description="Recent queries remembered (~1.5 KB each)."
    )
    probe_ttl_s: float = Field(3600.0, gt=0, description="How long a query is remembered.")
    probe_response: Literal["evidence", "repeat"] = Field(
        "evidence",
        description="Which near-duplicates of remembered queries get that query's earlier "
        "answer (or its refusal): probes only, a chain's queries after its first link "
        "(evidence), or every near-duplicate, a picture's first re-encode too (repeat).",
    )
    throttle_interval_s: float = Field(
        1.0, gt=0, le=3600, description="A throttled client gets one request per interval."
    )
    alert_s: float = Field(
        0.0,
        ge=0,
        le=86_400,
        description="How long policy stays tightened after a campaign's last decision: while "
        "a campaign of linked identities is throttled or worse, a young identity's suspicious "
        "images are withheld too (0, the default: never tighten; honest newcomers' photos are "
        "suspicious far more often than the review tier's calibrated rate).",
    )
    alert_young_images: int = Field(
        100,
        ge=0,
        le=1_000_000,
        description="Images an identity must have sent before an alert leaves it alone: "
        "fresh identities are what a rotating attacker sends from.",
    )
    max_tracked_clients: int = Field(
        100_000, ge=1, description="Clients whose evidence is kept (least recently seen go)."
    )
    knn_clients: int = Field(
        1024,
        ge=1,
        le=1_000_000,
        description="Clients whose recent embeddings the k-NN detector keeps (a ring of the "
        "calibrated history per client and model, float32: 51 KB each for the digits model).",
    )
    line_search_clients: int = Field(
        4096,
        ge=1,
        le=1_000_000,
        description="Clients whose last 8 pictures the line-search test keeps (8-bit, at most "
        "1,024 values a picture: 8 KB each for the digits model).",
    )
    review_backlog: int = Field(
        1024,
        ge=1,
        le=1_000_000,
        description="Review copies of suspicious inputs waiting to be written; past it new "
        "copies are dropped (counted in bastion_screening_reviews_total), never the response.",
    )
    # -- the incident lifecycle (gateway/incidents) --------------------------------------------
    incident_log_path: Path = Field(
        Path.home() / ".local" / "share" / "bastion" / "incidents.db",
        description="SQLite file of the tamper-evident incident log (every security decision).",
    )
    incident_key_path: Path = Field(
        Path.home() / ".config" / "bastion" / "incident-signing.key",
        description="Ed25519 key (PEM) that signs the log's checkpoints; kept outside the "
        "database, created on first use.",
    )
    incident_checkpoint_path: Path = Field(
        Path.home() / ".config" / "bastion" / "incident-checkpoint.json",
        description="Witness file of the log's latest signed checkpoint, outside the database: "
        "'bastion incidents verify' catches a log cut short by comparing against it.",
    )
    incident_log_backlog: int = Field(
        10_000,
        ge=1,
        le=1_000_000,
        description="Decisions waiting to be written to the log (also while its database is "
        "away: they are written in order once it is back); past it new ones are dropped and "
        "counted (bastion_incident_log_dropped_total).",
    )
    ledger: bool = Field(
        True, description="Record every screened image's outcome, client and prediction."
    )
    ledger_path: Path = Field(
        Path.home() / ".local" / "share" / "bastion" / "ledger.db",
        description="SQLite file of the served-prediction ledger (what was answered to whom).",
    )
    ledger_retention_s: float = Field(
        30 * 86400.0, gt=0, description="Ledger rows older than this are deleted."
    )
    ledger_max_rows: int = Field(
        10_000_000, ge=1000, description="Ledger rows kept at most; the oldest go first."
    )
    ledger_backlog: int = Field(
        10_000,
        ge=1,
        le=1_000_000,
        description="Requests waiting to be written to the ledger; past it their rows are "
        "dropped and counted (bastion_ledger_dropped_total).",
    )
    max_note_chars: int = Field(1024, ge=1, description="Longest admin note on a record.")
    log_level: str = Field("info", description="Python logging level.")
    access_log: bool = Field(False, description="uvicorn's access log (costs throughput).")
    otel_endpoint: str | None = Field(
        None,
        max_length=2048,
        pattern=r"^https?://",
        description="OTLP endpoint that receives OpenTelemetry traces of every request (e.g. "
        "http://collector:4318 for OTLP/HTTP, http://collector:4317 for OTLP/gRPC); unset: no "
        "tracing at all.",
    )
    otel_protocol: Literal["http/protobuf", "grpc"] = Field(
        "http/protobuf", description="The OTLP transport to the endpoint (OpenTelemetry's names)."
    )
    otel_sampling_ratio: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Share of requests traced when the caller's traceparent does not say "
        "(a sampled one is followed, within otel_max_traces_per_s); at 0.1, 10 % of "
        "throughput on 2 cores, the exporter process included (benchmarks/RESULTS.md 14c).",
    )
    otel_max_traces_per_s: int = Field(
        200,
        ge=1,
        le=1_000_000,
        description="Traced requests a second at most, whatever callers' traceparent asks: a "
        "client that marks every request sampled cannot make the gateway trace them all.",
    )
    otel_service_name: str = Field(
        "bastion", min_length=1, max_length=128, description="service.name of the traces."
    )

    @model_validator(mode="after")
    def _header_name(self) -> Settings:
        """HTTP header names are case-insensitive and arrive lower-cased (RFC 9110 §5.1)."""
        self.client_id_header = self.client_id_header.lower()
        if not _TOKEN.fullmatch(self.client_id_header):
            raise ValueError(f"client_id_header {self.client_id_header!r} is not a header name")
        return self

    @model_validator(mode="after")
    def _redis_scheme(self) -> Settings:
        """A mistyped URL fails at start, not at the first request."""
        if self.redis_url is not None and not self.redis_url.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ValueError("redis_url starts with redis://, rediss:// or unix://")
        return self

    @model_validator(mode="after")
    def _drift_can_alarm(self) -> Settings:
        """Refuses drift settings under which a statistic could never raise an alarm."""
        if self.drift_min_images > self.drift_hop_images * self.drift_window_hops:
            raise ValueError(
                "drift_min_images is more than a window holds (drift_hop_images x "
                "drift_window_hops): no window would ever be scored"
            )
        if self.drift_mmd_permutations + 1 < 1 / self.drift_mmd_alpha:
            raise ValueError(
                "drift_mmd_permutations is too few for drift_mmd_alpha: the smallest p-value, "
                "1 / (permutations + 1), is above it, so MMD could never raise an alarm"
            )
        per_hop = self.drift_embedding_sample // self.drift_window_hops
        if per_hop * self.drift_window_hops < 20:
            raise ValueError("drift_embedding_sample leaves under 20 embeddings per window")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _FileSource(settings_cls)


class _FileSource(PydanticBaseSettingsSource):
    """Reads ``BASTION_CONFIG_FILE`` (TOML or JSON) when it is set."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get("BASTION_CONFIG_FILE")
        if not path:
            return {}
        return load_config_file(Path(path))


def load_config_file(path: Path) -> dict[str, Any]:
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    return dict(data.get("bastion", data))


def unknown_environment(environ: dict[str, str] | None = None) -> list[str]:
    """``BASTION_*`` variables no setting reads: most likely misspelt, and silently ignored."""
    names = {f"BASTION_{name.upper()}" for name in Settings.model_fields}
    environ = dict(os.environ) if environ is None else environ
    return sorted(
        key
        for key in environ
        if key.startswith("BASTION_") and key not in names and key not in OTHER_VARIABLES
    )
