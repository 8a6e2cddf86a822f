"""The server's settings: the frozen ``Settings``, which ``servekit.config`` reads once (the file, the environment,
the flags), and ``Address``, where a port listens.

Keys and defaults follow TorchServe 0.12's ``config.properties`` (``../shared/reference/torchserve.md`` §6). The
docstring of each ``Settings`` field is its user documentation: ``docs/configuration.md`` is generated from them
(``docs/gen_config_reference.py``). Reads no file and no environment variable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from servekit.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Address:
    """A listening address parsed from ``http://host:port`` or ``https://host:port`` (TLS, ``servekit.tls``)."""

    host: str
    port: int
    scheme: str = "http"

    @classmethod
    def parse(cls, key: str, value: str) -> Address:
        parts = urlsplit(value if "://" in value else f"http://{value}")
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
            raise ConfigError(f"{key}: expected http://host:port or https://host:port, got {value!r}")
        return cls(parts.hostname, port, parts.scheme)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the server needs to start, read once."""

    inference_address: Address = Address("127.0.0.1", 8080)
    """Where the inference API listens: ``/ping``, ``/predictions``, the Open Inference Protocol (KServe v2) and
    KServe v1. ``https://host:port`` serves HTTPS with the key and certificate of ``keystore`` or
    ``private_key_file``/``certificate_file``, as each address can. No ``unix:`` sockets."""
    management_address: Address = Address("127.0.0.1", 8081)
    """Where the management API listens. Keep it on a loopback address, or keep token authorization on."""
    metrics_address: Address = Address("127.0.0.1", 8082)
    """Where the metrics API (``GET /metrics``, Prometheus text, no key needed) listens."""
    private_key_file: Path | None = None
    """The HTTPS ports' private key: a PEM file, PKCS#8 (``BEGIN PRIVATE KEY``) or OpenSSL's traditional form
    (``BEGIN RSA PRIVATE KEY``), not encrypted; RSA, EC or Ed25519. Needs ``certificate_file``."""
    certificate_file: Path | None = None
    """The HTTPS ports' certificate chain, PEM: the server's certificate first, then the intermediate ones. Its
    certificate must be the one of ``private_key_file``'s key."""
    keystore: Path | None = None
    """A PKCS12 keystore (``.p12``, ``.pfx``; Java's ``keytool`` writes one by default) holding the HTTPS ports' key
    and certificate chain; its first key entry is used. Takes precedence over ``private_key_file`` and
    ``certificate_file``. A Java JKS keystore is refused at start with the ``keytool`` command that converts it."""
    keystore_pass: str = "changeit"
    """The password of ``keystore``, and of its key entry (they must be the same, as in TorchServe)."""
    keystore_type: str = "PKCS12"
    """``PKCS12``; ``JKS`` is accepted as a name for a file that is PKCS12 inside (Java reads both under either
    name)."""
    client_ca_file: Path | None = None
    """Mutual TLS: a PEM file of the certificate authorities whose client certificates the HTTPS ports accept. When
    set, a client must present a certificate signed by one of them, or its connection is refused during the TLS
    handshake. servekit's key (TorchServe has none)."""
    cors_allowed_origin: str | None = None
    """CORS: the ``Access-Control-Allow-Origin`` header sent, as written, on every response of the three ports (``*``
    or an origin such as ``https://app.example``). A preflight ``OPTIONS`` is answered by the route, as in
    TorchServe."""
    cors_allowed_methods: str | None = None
    """CORS: the ``Access-Control-Allow-Methods`` header sent on every response, e.g. ``GET, POST, PUT, OPTIONS``."""
    cors_allowed_headers: str | None = None
    """CORS: the ``Access-Control-Allow-Headers`` header sent on every response, e.g. ``Content-Type,
    Authorization``."""
    grpc_inference_address: str = "127.0.0.1"
    """The host (name or IP address, not a URL, as in TorchServe) where the gRPC inference API listens: TorchServe's
    ``InferenceAPIsService`` (``Ping``, ``Predictions``, ``StreamPredictions``, ``StreamPredictions2``)."""
    grpc_inference_port: int = 7070
    """The port of the gRPC inference API."""
    grpc_management_address: str = "127.0.0.1"
    """The host where the gRPC management API (TorchServe's ``ManagementAPIsService``) listens. Keep it on a loopback
    address, or keep token authorization on."""
    grpc_management_port: int = 7071
    """The port of the gRPC management API."""
    grpc_inference_max_connection_age_ms: int | None = None
    """Close each gRPC inference connection after this many milliseconds (the client reconnects: this rebalances
    long-lived connections across replicas behind a load balancer); unset, never, as in TorchServe."""
    grpc_inference_max_connection_age_grace_ms: int | None = None
    """How long calls still running on a connection closed for its age may go on before they are cancelled; unset,
    until they end."""
    grpc_management_max_connection_age_ms: int | None = None
    """``grpc_inference_max_connection_age_ms`` for the gRPC management port."""
    grpc_management_max_connection_age_grace_ms: int | None = None
    """``grpc_inference_max_connection_age_grace_ms`` for the gRPC management port."""
    enable_grpc: bool = True
    """Serve the two gRPC APIs; ``false`` opens neither port. servekit's key (TorchServe always serves them)."""
    enable_grpc_ssl: bool = False
    """Serve the gRPC ports over TLS, with the key and certificate the HTTPS ports use (``private_key_file`` and
    ``certificate_file``, or ``keystore``); with ``client_ca_file``, clients must present a certificate too."""
    model_store: Path | None = None
    """The folder of model archives (``.mar``, ``.tar.gz``, ``.tgz``, ``.zip``, ``.model``) and unpacked model
    folders. ``--model-store`` sets it. Registering a model, and ``load_models=all``, need it."""
    load_models: tuple[str, ...] = ()
    """The models to load at start, comma-separated: ``all`` (every archive and model folder of the model store),
    or ``[name=]location`` entries, relative to the model store. ``--models`` sets it. Ignored when a snapshot is
    restored."""
    models: Mapping[str, Mapping[str, Mapping[str, object]]] = field(default_factory=dict)
    """Per-model settings as JSON, in TorchServe's shape: ``{"name": {"version": {"minWorkers": 1, "maxWorkers":
    1, "batchSize": 8, "maxBatchDelay": 50, "responseTimeout": 120, "startupTimeout": 120, "jobQueueSize":
    100}}}``. The model-config YAML and registration parameters take precedence."""
    default_workers_per_model: int = 1
    """Workers of a startup model whose model-config YAML sets no ``minWorkers`` (TorchServe: one per CPU core or
    GPU). When set in config.properties, also the workers of a registration that names no ``initial_workers``;
    unset, such a registration gets none, as in TorchServe."""
    job_queue_size: int = 100
    """Requests each model version may hold waiting for a worker; past that, requests are answered 503 with
    ``Retry-After`` (queue full). Batches already handed to a worker are not waiting: a busy worker holds the next
    batch, and under overload a fast model's worker holds up to 10 ms of its measured handler time in batches (at
    most 64), which are admitted beyond the queue. ``jobQueueSize`` in a model-config YAML overrides it for that
    model."""
    default_response_timeout: float = 120.0
    """Seconds a worker may take to answer one batch; then the batch is answered 504 and the worker is killed and
    replaced. Per model: ``responseTimeout`` (model-config YAML) or ``response_timeout`` (registration)."""
    default_startup_timeout: float = 120.0
    """Seconds a worker may take to start and load its model (the handler's ``initialize``) before the load fails.
    Per model: ``startupTimeout`` or ``startup_timeout``."""
    fork_workers: bool = True
    """Start workers by forking them from a zygote: a process the server starts, which has imported torch and the
    worker code once, so that a worker starts in milliseconds and shares those pages with the others (Linux; "Where
    it runs" in handlers.md). ``false`` starts every worker as a fresh Python, as happens anyway while the zygote is
    not available. servekit's key."""
    unregister_model_timeout: float = 120.0
    """Seconds an unregister may take: the requests queued and running finish, then the workers exit. Past it, what
    is still queued is answered 503, the workers are killed and the unregister is answered 408, as in TorchServe;
    the model then stays registered with no workers until it is unregistered again."""
    drain_timeout: float = 30.0
    """Seconds that SIGTERM (or SIGINT) leaves requests in flight and queued to finish, before the workers stop
    and the server exits."""
    http_header_timeout: float = 10.0
    """Seconds within which a request's line and headers must arrive, or the connection is closed (slow clients,
    slow loris)."""
    http_body_timeout: float = 60.0
    """Seconds within which a request's body must arrive once its headers have, or the connection is closed."""
    access_log: bool = True
    """Log a line per request, in TorchServe's access-log layout."""
    log_format: str = "text"  # or "json"
    """``text``, or ``json`` for one JSON object per log line."""
    max_request_size: int = 6553500
    """The largest request body, in bytes; a larger one is answered 413 as soon as that is known."""
    max_response_size: int = 6553500
    """The largest answer to one request, in bytes; a larger handler result is answered 500 naming the limit."""
    decode_input_request: bool = True
    """Decode request values for the handler as TorchServe does (``application/json``: the parsed JSON,
    ``text/*``: ``str``, else ``bytearray``); false passes every value as ``bytearray``."""
    ts_header_key_sequence_id: str = "ts_request_sequence_id"
    """Sequence batching (model-config ``sequenceBatching: true``): the request header that names a request's sequence,
    and the response header that gives it back; the handler sees the id under this name, and
    ``context.get_sequence_id(idx)`` returns it."""
    ts_header_key_sequence_start: str = "ts_request_sequence_start"
    """Sequence batching: the header, ``true``, that the handler sees on the first request of a sequence."""
    ts_header_key_sequence_end: str = "ts_request_sequence_end"
    """Sequence batching: a request with this header set to ``true`` is its sequence's last; a handler that sets it on
    an answer (to the sequence id, or ids separated by ``;``) closes those sequences, as in TorchServe. gRPC
    ``StreamPredictions2`` reads it from the request's inputs."""
    service_envelope: str | None = None
    """Wrap every model's handler in one of TorchServe's request envelopes: ``kserve`` (a body's ``instances`` are
    the handler's data, its results answered as ``{"predictions": [...]}``) or ``kservev2`` (the Open Inference
    Protocol's ``inputs`` in, ``outputs`` out). With one, ``/v1/models/{m}:predict`` and ``/v2/models/{m}/infer``
    go through the handler as in TorchServe; without, they are served natively on the model's tensors."""
    number_of_gpu: int | None = None
    """Use at most this many GPUs (default: every NVIDIA GPU visible, narrowed by ``CUDA_VISIBLE_DEVICES``); 0
    runs every model on the CPU."""
    allowed_urls: tuple[str, ...] = ()  # no remote model URLs unless configured (TorchServe allows any)
    """Comma-separated regular expressions; a model URL to register must fully match one. Empty, the default,
    allows no remote URL (TorchServe's default allows any). The URL's host is then resolved once and the download
    connects to a checked address: loopback, link-local (cloud metadata) and unspecified addresses, and the server's
    own, are refused unless a pattern names that IP address (``http://127\\.0\\.0\\.1:8000/.*`` names 127.0.0.1, for
    that port); redirects are checked the same way."""
    token_expiration_min: float = 60.0
    """Minutes the inference and management keys stay valid; ``/token`` rotates a key and restarts its clock."""
    max_download_size: int = 2**30
    """The largest archive, in bytes, that registering a model from a URL downloads."""
    download_timeout: float = 300.0
    """Seconds a model archive download may take."""
    disable_token_authorization: bool = False
    """Serve without keys (``--disable-token-auth``). By default the keys are written to ``key_file.json``."""
    key_file: Path | None = None
    """Token authorization with keys the operator supplies (e.g. a mounted Kubernetes Secret), instead of keys made at
    start: a JSON file in the shape of TorchServe's ``key_file.json`` (``inference`` and ``management`` entries, each
    ``{"key": ...}`` with an optional ``"expiration time"``, and an optional ``API`` entry), read once at start and
    never written or removed. Every replica given the same file accepts the same keys; ``/token`` rotation is refused
    (405). The environment variables ``SERVEKIT_INFERENCE_KEY`` and ``SERVEKIT_MANAGEMENT_KEY`` (and optionally
    ``SERVEKIT_API_KEY``), always read, supply keys the same way. Each key is at least 22 visible ASCII characters, the
    kinds' keys differ; a file or variable that is missing, unreadable or malformed stops the start (exit code 1)."""
    enable_model_api: bool = False
    """Allow registering and unregistering models through the management API (``--enable-model-api``); without it
    those answer 405."""
    snapshots: bool = True
    """Write the registered models to a snapshot after every change and restore them at start; ``--ncs`` turns
    this off. servekit's key (TorchServe has only the flag)."""
    log_location: Path = Path("logs")
    """Where the log of a background start (``servekit.log``) and the snapshots (``config/``) go. Set only by the
    ``LOG_LOCATION`` environment variable, not by a key."""
    test_hosts: Path | None = None
    """Tests only: a hosts file (``ADDRESS NAME...`` lines) that answers the model-download look-ups of names ending in
    ``.test``, which no DNS resolves (RFC 6761), so that a test can make a name resolve to any address without the
    network. It changes no other name, and its answers are checked like the DNS's (``servekit.destination``). Set only
    by the ``SERVEKIT_TEST_HOSTS`` environment variable."""
    supplied_keys: Mapping[str, str] = field(default_factory=dict, repr=False)
    """The keys of the ``SERVEKIT_<KIND>_KEY`` environment variables that are set, by kind; internal, never shown."""
    raw: Mapping[str, str] = field(default_factory=dict)
    """Every key and value as read, the unused ones included; internal."""
