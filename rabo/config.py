"""One typed configuration schema, loaded from YAML and overridable by flags.

Every field is a keyword-only dataclass field with a one-line help text, its unit where it has
one, and its allowed range or values (in the style of torchtitan's job config). Loading checks
every key: an unknown key, a wrong type or an out-of-range value raises :class:`ConfigError`
naming the dotted key and what is allowed.

Choices tagged [recon] in ``docs/method.md`` are reconstructions of the paper; each is an option
here so that the method can follow the paper once it is confirmed, by a setting and not a rewrite.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from rabo.errors import ConfigError

_MISSING = dataclasses.MISSING


def opt(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A config field with its help text and numeric bounds (inclusive ge/le, exclusive gt/lt)."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=meta)
    if dataclasses.is_dataclass(default):
        cls = type(default)
        return field(default_factory=cls, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- sections


@dataclass(kw_only=True)
class ModelConfig:
    kind: str = opt("mlp", "width-prunable model: 'mlp', 'cnn' or a kind registered by a model "
                    "plugin (docs/models.md)")
    hidden: list[int] = opt(
        [200], "hidden widths in units (MLP layers; for the CNN, dense layers after the convs)"
    )
    channels: list[int] = opt([32, 64], "CNN convolution channels, one entry per conv block")
    kernel: int = opt(3, "CNN kernel size (odd; 'same' padding, 2x2 max-pool after each)", ge=1)
    options: dict[str, int | float | bool | str | list[int] | list[float]] = opt(
        {}, "settings a model of your own reads (docs/models.md); the built-in models take none")
    scaler: Literal["none", "forward", "consistent"] = opt(
        "consistent",
        "none: submodels run unscaled; forward: [recon] HeteroFL's scaler, a submodel multiplies "
        "its hidden outputs by full / kept width (meant to sit before a normalization layer; "
        "without one it amplifies a small client's gradients, and RABO warns); consistent: "
        "[ext] the forward scaler with each client's y steps, v update and hypergradient scaled "
        "per tensor by the kept fraction of that tensor (measured best, docs/method.md)")

    def validate(self, key: str) -> None:
        if not self.kind.strip():
            raise ConfigError(f"{key}.kind: must name a model, e.g. 'mlp'")
        if self.kind in ("mlp", "cnn") and self.options:
            raise ConfigError(f"{key}.options: the built-in {self.kind} takes no options, got "
                              f"{sorted(self.options)}")
        if self.kind == "mlp" and not self.hidden:
            raise ConfigError(f"{key}.hidden: an MLP needs at least one hidden layer")
        if self.kind == "cnn" and not self.channels:
            raise ConfigError(f"{key}.channels: a CNN needs at least one convolution block")
        for name in ("hidden", "channels"):
            for i, w in enumerate(getattr(self, name)):
                if w < 1:
                    raise ConfigError(f"{key}.{name}[{i}]: widths must be >= 1, got {w}")
        if self.kernel % 2 != 1:
            raise ConfigError(f"{key}.kernel: must be odd, got {self.kernel}")


@dataclass(kw_only=True)
class DataConfig:
    dataset: Literal["mnist", "digits", "mnist1d", "mnist-full", "fashion-mnist", "cifar10"] = opt(
        "mnist",
        "mnist: the bundled MNIST test set (10,000 images); digits: scikit-learn's 8x8 digits; "
        "mnist1d: generated locally; mnist-full / fashion-mnist / cifar10: read from data.root",
    )
    root: str | None = opt(
        None,
        "directory holding the data files (None: RABO_DATA_DIR, then the bundled location)",
    )
    split: Literal["iid", "shards", "dirichlet"] = opt("iid", "how samples are dealt to clients")
    alpha: float = opt(0.3, "Dirichlet concentration (split=dirichlet; smaller: more skew)", gt=0)
    shards_per_client: int = opt(2, "label-sorted shards per client for split=shards", ge=1)
    val_fraction: float = opt(0.2, "fraction of each client's samples held for the upper level",
                              gt=0, lt=1)
    test_fraction: float = opt(0.2, "fraction of the pool held out as the global test set "
                               "(when the data set has no test split of its own)", gt=0, lt=1)
    batch_size: int = opt(64, "mini-batch size of every local gradient (0: full batch)", ge=0)
    max_samples: int = opt(0, "use only the first N samples of the pool (0: all)", ge=0)
    label_noise: float = opt(0.0, "fraction of client train labels corrupted once at build "
                             "time (task C, hyper-cleaning)", ge=0, lt=1)


@dataclass(kw_only=True)
class ClientsConfig:
    count: int = opt(10, "number of clients (data partitions)", ge=1)
    participation: float = opt(1.0, "fraction of clients sampled each round", gt=0, le=1)
    ratios: list[float] | None = opt(
        None, "fixed width ratio per client, cycled over clients (HeteroFL-style); "
        "None: choose from memory_budgets with the ratio policy"
    )
    memory_budgets: list[str] | None = opt(
        None, "simulated per-client training memory budget, e.g. [8GiB, 512MiB], cycled; "
        "None with ratios None: every client at ratio 1"
    )
    mode: Literal["adaptive", "full", "exclusion"] = opt(
        "adaptive", "adaptive: each client at its own ratio (fixed list or policy); full: every "
        "client at ratio 1, as if all were rich (the upper-bound baseline); exclusion: only "
        "clients whose ratio is 1 take part (the baseline that drops the poor)")

    def validate(self, key: str) -> None:
        if self.ratios is not None:
            if not self.ratios:
                raise ConfigError(f"{key}.ratios: must not be empty (use null for none)")
            for i, r in enumerate(self.ratios):
                if not 0 < r <= 1:
                    raise ConfigError(f"{key}.ratios[{i}]: must be in (0, 1], got {r}")
        if self.memory_budgets is not None:
            from rabo.units import parse_bytes

            for i, b in enumerate(self.memory_budgets):
                try:
                    parse_bytes(b)
                except ValueError as exc:
                    raise ConfigError(f"{key}.memory_budgets[{i}]: {exc}") from None


@dataclass(kw_only=True)
class MaskConfig:
    policy: Literal["static", "rolling", "random"] = opt(
        "rolling", "[recon] submodel index policy: static prefix (HeteroFL), rolling window "
        "(FedRolex), random per round and client (Federated Dropout)"
    )
    rolling_stride: int = opt(0, "units a rolling window moves per round; 0: tied to the layer, "
                              "ceil(width / sweep_rounds) but at most the window's size",
                              ge=0)
    sweep_rounds: int = opt(8, "rolling masks with rolling_stride 0: rounds a window takes to "
                            "sweep a layer (a window smaller than width/sweep_rounds takes "
                            "width/window rounds)", ge=1)
    layer_shift: bool = opt(True, "[ext] rolling: after each sweep, layer g's window moves g "
                            "positions further, so that the windows of consecutive layers "
                            "take every relative offset and a small client's submodel reaches "
                            "every block of a hidden-to-hidden weight, not only the diagonal")


@dataclass(kw_only=True)
class EstimatorConfig:
    name: Literal["fd-central", "fd-forward", "exact", "neumann"] = opt(
        "fd-central", "hypergradient estimator"
    )
    delta: float = opt(1e-2, "[recon] finite-difference size; the step is delta / ||v||", gt=0)
    eta_v: float = opt(0.05, "step size of the linear-system (v) update", gt=0)
    radius: float = opt(10.0, "[recon] projection radius R = C_fy / mu of v (0: no projection)",
                        ge=0)
    neumann_terms: int = opt(5, "terms of the truncated Neumann series (estimator=neumann)", ge=1)
    neumann_eta: float = opt(0.5, "step of the Neumann series (estimator=neumann)", gt=0)


@dataclass(kw_only=True)
class InnerConfig:
    steps: int = opt(1, "K: lower-level (y) SGD steps per local iteration", ge=1)
    lr: float = opt(0.1, "lower-level step size eta_y", gt=0)


@dataclass(kw_only=True)
class OuterConfig:
    optimizer: Literal["sgd", "momentum", "adam"] = opt(
        "sgd", "x optimizer on the coordinator (RABO); RAFBO clients use plain SGD locally"
    )
    lr: float = opt(0.1, "upper-level step size eta_x", gt=0)
    momentum: float = opt(0.9, "momentum (optimizer=momentum) / Adam beta1", ge=0, lt=1)
    beta2: float = opt(0.999, "Adam beta2", ge=0, lt=1)
    local_steps: int = opt(1, "T: local iterations per round (RAFBO)", ge=1)
    server_lr: float = opt(1.0, "RAFBO server step on the averaged x delta", gt=0)


@dataclass(kw_only=True)
class TaskConfig:
    mu: float = opt(0.01, "task A: strong convexity mu of g in the head y ((mu/2)||y||^2)", ge=0)
    log_l2_init: float = opt(-4.0, "task B: initial per-weight log L2 strength x")
    clean_c: float = opt(1e-3, "task C: ridge c of g = sum sigmoid(x_k) CE_k + c||y||^2", ge=0)


@dataclass(kw_only=True)
class AggregationConfig:
    max_update_rms: float = opt(
        100.0, "an update part (x hypergradient or delta, y delta, v delta) whose RMS exceeds "
        "this many times max(1, RMS of the global values it updates) is refused before "
        "aggregation, so that one worker cannot move the model arbitrarily far (honest "
        "updates measured here stay below 0.1); 0: no bound", ge=0)
    clip_rms: float = opt(
        0.0, "[ext] robust aggregation, norm clipping: each update part is scaled down to at "
        "most this many times the median RMS of that part over the round's updates before "
        "coverage averaging (0: off)", ge=0)
    weighting: Literal["uniform", "samples", "inverse-ratio"] = opt(
        "uniform", "[recon] weight of each client in coverage averaging: uniform, its sample "
        "count, or [ext] 1/ratio (equal influence per client and round)")


@dataclass(kw_only=True)
class WireConfig:
    dtype: Literal["float32", "bfloat16", "float16", "int8"] = opt(
        "float32", "[ext] element type of the x, y and v slices on the wire, both ways (every "
        "transport, the simulator included, rounds to it the same way): the coordinator keeps "
        "float32 master state and the worker computes in float32; 16-bit halves the bytes, "
        "int8 (codes with a float32 absmax scale per wire.block entries) takes 0.254x at a "
        "block of 256 (docs/communication.md)")
    block: int = opt(256, "[ext] int8: entries per block scale (each tensor's entries in "
                     "row-major order; a larger block costs fewer bytes and rounds coarser)",
                     ge=1, le=1 << 20)
    error_feedback: bool = opt(
        True, "[ext] int8: a worker adds what its last quantized updates could not carry "
        "(per client, in full-model coordinates) to its next update, as error-feedback SGD "
        "does; off: each update is rounded on its own")


@dataclass(kw_only=True)
class WorkerConfig:
    step: Literal["auto", "eager", "compiled", "graph"] = opt(
        "auto", "[ext] how a worker runs its local work: eager PyTorch; compiled "
        "(torch.compile with compile_backend, once per ratio); graph (CUDA graphs through "
        "torch.compile's reduce-overhead mode, CUDA only: eager elsewhere); auto: eager "
        "(rabo/step.py)")
    compile_backend: Literal["inductor", "aot_eager"] = opt(
        "inductor", "[ext] torch.compile backend of worker.step: compiled (inductor: fused "
        "kernels; aot_eager: traced, eager kernels, eager's numbers bit for bit)")


@dataclass(kw_only=True)
class PolicyConfig:
    ladder: list[float] = opt(
        [1.0, 0.5, 0.25, 0.125, 0.0625], "[recon] width ratios the coordinator may assign"
    )
    safety: float = opt(0.8, "fraction of a worker's memory budget the estimate may use",
                        gt=0, le=1)
    deadline_s: float = opt(0.0, "estimated local-step time must fit this (0: no deadline)",
                            ge=0)
    link: bool = opt(False, "[ext] with deadline_s: the estimated step time plus the time the "
                     "round's slices take over the worker's link (a fixed part plus seconds "
                     "per byte, fitted to the rounds it ran) must fit the deadline; until a "
                     "worker's link is measured it gets the smallest ratio that fits its "
                     "memory (gRPC workers; torch.distributed stamps arrivals in rank order and "
                     "the simulator moves nothing, so there it does not apply; "
                     "docs/method.md)")
    calibrate: bool = opt(False, "[ext] once a worker has reported its measured peak memory "
                          "at a ratio, its memory figures come from its measurements (the "
                          "analytic estimate scaled by measured / estimated at the nearest "
                          "ratio it ran) instead of the estimate alone (gRPC and "
                          "torch.distributed workers; docs/method.md). Off by default until "
                          "the estimate's "
                          "fixed part is calibrated: on small models a worker's first-round "
                          "peak includes one-time allocations and reads above the estimate")

    def validate(self, key: str) -> None:
        if not self.ladder:
            raise ConfigError(f"{key}.ladder: must hold at least one ratio")
        for i, r in enumerate(self.ladder):
            if not 0 < r <= 1:
                raise ConfigError(f"{key}.ladder[{i}]: must be in (0, 1], got {r}")


@dataclass(kw_only=True)
class ClusterConfig:
    bind: str = opt("127.0.0.1:50051", "coordinator gRPC address HOST:PORT (port 0: pick one)")
    min_workers: int = opt(1, "updates needed to aggregate a round", ge=1)
    workers: int = opt(0, "workers to wait for before round 1 (0: clients.count)", ge=0)
    round_deadline_s: float = opt(120.0, "a round closes this long after it opened (later while "
                                  "a worker's transfer still makes progress, see stall_timeout_s)",
                                  gt=0)
    stall_timeout_s: float = opt(15.0, "past the deadline a round stays open while some assigned "
                                 "worker's bytes moved within this many seconds (and, after "
                                 "the first such window, at min_transfer_bytes_per_s)", gt=0)
    min_transfer_bytes_per_s: float = opt(
        65536.0, "past the deadline plus one stall_timeout_s, a transfer keeps a round open "
        "only while it moves at least this many bytes per second on average since the deadline "
        "(a worker trickling tiny chunks cannot hold everyone)", ge=0)
    round_grace_s: float = opt(120.0, "a round never stays open longer than this past its "
                               "deadline, whatever moves", gt=0)
    max_round_retries: int = opt(3, "times a round with fewer than min_workers updates is "
                                 "retried (model unchanged) before the run stops", ge=0)
    checkpoint_every: int = opt(5, "checkpoint every N rounds (0: only at the end and on "
                                "SIGTERM)", ge=0)
    keep_checkpoints: int = opt(3, "checkpoints kept in the run folder (older ones deleted)",
                                ge=1)
    message_timeout_s: float = opt(
        30.0, "an update stream that goes this long without a message (its first included) "
        "is ended (DEADLINE_EXCEEDED): a peer that opens streams and sends nothing holds "
        "nothing for long", gt=0)
    max_calls_per_host: int = opt(
        256, "concurrent calls the coordinator serves from one host address; more are "
        "refused at once (RESOURCE_EXHAUSTED). A worker holds about 3; 0: no limit", ge=0)
    max_streams_per_connection: int = opt(
        1000, "HTTP/2 concurrent streams the coordinator allows on one connection (bounds "
        "what calls that never send their request cost it; in-process clients share one "
        "connection per target)", ge=1)
    register_rate_per_s: float = opt(5.0, "registrations allowed per second from one peer "
                                     "address (bursts of 4x)", gt=0)
    health_port: int = opt(0, "plaintext port serving only grpc.health.v1 (for kubelet probes, "
                           "which cannot do TLS); 0: off", ge=0, le=65535)
    register_timeout_s: float = opt(300.0, "how long to wait for workers before round 1", gt=0)
    heartbeat_s: float = opt(2.0, "worker heartbeat interval", gt=0)
    heartbeat_misses: int = opt(5, "missed heartbeats before a worker expires", ge=1)
    chunk_bytes: int = opt(1024 * 1024, "tensor chunk size on the wire (1 MiB streamed about "
                           "twice as fast as 2 MiB through gRPC Python here)", ge=1024)
    max_message_bytes: int = opt(64 * 1024 * 1024, "gRPC maximum message size", ge=64 * 1024)
    dist_timeout_s: float = opt(120.0, "torch.distributed backend: how long a collective, send "
                                "or receive may wait before the job stops with an error", gt=0)
    metrics_port: int = opt(0, "Prometheus metrics port on the coordinator (0: off)", ge=0,
                            le=65535)


@dataclass(kw_only=True)
class Config:
    seed: int = opt(0, "seed of everything random: data split, init, masks, batches", ge=0)
    rounds: int = opt(30, "communication rounds Q", ge=1)
    algorithm: Literal["rabo", "rafbo"] = opt(
        "rabo", "[recon] rabo: coordinator takes the x step from averaged hypergradients; "
        "rafbo: clients take T local steps and the coordinator averages deltas"
    )
    task: Literal["A", "B", "C"] = opt(
        "A", "A: hyper-representation; B: per-weight L2 hyperparameters; C: data hyper-cleaning"
    )
    lower_level: Literal["global", "personalized"] = opt(
        "global", "[recon] global: y is averaged (FedNest form); personalized: y stays per client"
    )
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "where the simulator computes")
    eval_every: int = opt(1, "evaluate the global model (test accuracy, per class and per "
                          "width, validation upper_loss) every N rounds (and the last)", ge=1)
    hypergradient_every: int = opt(
        0, "at evaluated rounds that are multiples of N (and the last), also compute the exact "
        "full-batch hypergradient norm of the global model (CG on exact Hessian-vector "
        "products; costly); 0: never", ge=0)
    model: ModelConfig = opt(ModelConfig(), "model")
    data: DataConfig = opt(DataConfig(), "data")
    clients: ClientsConfig = opt(ClientsConfig(), "clients")
    mask: MaskConfig = opt(MaskConfig(), "mask policy")
    estimator: EstimatorConfig = opt(EstimatorConfig(), "hypergradient estimator")
    inner: InnerConfig = opt(InnerConfig(), "lower level")
    outer: OuterConfig = opt(OuterConfig(), "upper level")
    task_params: TaskConfig = opt(TaskConfig(), "task constants")
    aggregation: AggregationConfig = opt(AggregationConfig(), "aggregation")
    policy: PolicyConfig = opt(PolicyConfig(), "resource-adaptive ratio policy")
    wire: WireConfig = opt(WireConfig(), "what travels between coordinator and workers")
    worker: WorkerConfig = opt(WorkerConfig(), "how workers compute")
    cluster: ClusterConfig = opt(ClusterConfig(), "gRPC coordinator and workers")

    def validate(self, key: str = "") -> None:
        if self.task == "C" and self.lower_level == "personalized":
            raise ConfigError("lower_level: task C keeps x per client; use lower_level: global")
        if self.model.kind == "cnn" and self.data.dataset == "mnist1d":
            raise ConfigError("model.kind: cnn needs image data; mnist1d is 1-D (use mlp)")


# --------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return f"mapping of {_type_name(get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed;"
                              + _did_you_mean(value, [str(a) for a in allowed])
                              + " choose one of " + ", ".join(repr(a) for a in allowed))
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: must not be null; expected {_type_name(tp)}")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, item = get_args(tp)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or not k:
                raise ConfigError(f"{key}: keys must be non-empty strings, got {k!r}")
            out[k] = _coerce(v, item, f"{key}.{k}")
        return out
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (item,) = get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 1e-9 (no dot) as a string; accept what Python reads as a number
            try:
                number = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        else:
            number = float(value)
        if not math.isfinite(number):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # pragma: no cover - schema bug


def _check_bounds(value: Any, meta: typing.Mapping[str, Any], key: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    checks = (
        ("ge", lambda v, b: v >= b, ">="),
        ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "<="),
        ("lt", lambda v, b: v < b, "<"),
    )
    parts = [f"{sym} {meta[name]}" for name, _, sym in checks if meta.get(name) is not None]
    for name, ok, _ in checks:
        bound = meta.get(name)
        if bound is not None and not ok(value, bound):
            raise ConfigError(f"{key}: {value} is out of range; allowed: {' and '.join(parts)}")


def _did_you_mean(given: Any, choices: list[str]) -> str:
    """' did you mean 'x'?' for the closest of ``choices`` to a misspelt ``given``, or ''."""
    import difflib

    close = difflib.get_close_matches(str(given), choices, n=1, cutoff=0.6)
    return f" did you mean {close[0]!r}?" if close else ""


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = f"{prefix}.{raw_key}" if prefix else str(raw_key)
        if raw_key not in fields:
            raise ConfigError(f"{key}: unknown key;" + _did_you_mean(raw_key, list(fields))
                              + " allowed keys here: " + ", ".join(fields))
        coerced = _coerce(value, hints[raw_key], key)
        _check_bounds(coerced, fields[raw_key].metadata, key)
        if isinstance(coerced, list):
            for i, item in enumerate(coerced):
                _check_bounds(item, fields[raw_key].metadata, f"{key}[{i}]")
        kwargs[raw_key] = coerced
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(prefix or "")
    return obj


def from_dict(data: dict[str, Any] | None) -> Config:
    """Build a validated :class:`Config` from a plain mapping (as parsed from YAML)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"the config must be a mapping of keys, got {type(data).__name__}")
    cfg = _build(Config, data, "")
    # Sections validate themselves; the whole config checks cross-section rules.
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if dataclasses.is_dataclass(section) and hasattr(section, "validate"):
            section.validate(f.name)
    cfg.validate()
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain data (for summaries, checkpoints and the wire)."""
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into its key path and its YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. estimator.name=exact")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: the key is empty")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {exc}") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides to raw config data (validated later, with the rest)."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_raw(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {p}: not found") from None
    except OSError as exc:
        raise ConfigError(f"config file {p}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: the top level must be a mapping of keys")
    return data


def load(path: str | Path | None, overrides: typing.Iterable[str] = ()) -> Config:
    """Load a YAML config file (None: the defaults) and apply ``key=value`` overrides."""
    data = load_raw(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    try:
        return from_dict(data)
    except ConfigError as exc:
        where = f"config file {path}: " if path is not None else ""
        raise ConfigError(f"{where}{exc}") from None


def starter_yaml(cfg: Config) -> str:
    """``cfg`` as a YAML file a user can edit: every key, each with its help as a comment
    (``rabo config --init``); loading it gives ``cfg`` back."""
    import yaml

    helps = {key: help_ for key, _, _, help_ in describe()}
    lines = ["# A RABO config (rabo config --init). Every key is listed with what it does;",
             "# docs/config.md has the same table. Run: rabo simulate --config THIS_FILE", ""]

    def emit(data: dict[str, Any], prefix: str, indent: int) -> None:
        for k, v in data.items():
            key = f"{prefix}.{k}" if prefix else k
            pad = "  " * indent
            if isinstance(v, dict) and key not in helps:  # a section
                lines.append(f"{pad}{k}:")
                emit(v, key, indent + 1)
                continue
            text = yaml.safe_dump({k: v}, default_flow_style=True, width=10_000).strip()
            text = text[1:-1] if text.startswith("{") and text.endswith("}") else text
            note = helps.get(key, "")
            lines.append(f"{pad}{text}" + (f"  # {note}" if note else ""))
        if indent == 0:
            lines.append("")

    emit(to_dict(cfg), "", 0)
    return "\n".join(lines)


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) rows of the whole schema, for docs and ``rabo config``."""
    rows: list[tuple[str, str, str, str]] = []
    hints = typing.get_type_hints(cls)
    instance = cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key + "."))  # type: ignore[arg-type]
            continue
        rows.append((key, _type_name(tp), repr(getattr(instance, f.name)), f.metadata["help"]))
    return rows


def markdown() -> str:
    """docs/config.md: every key with its type, default and meaning (generated)."""
    lines = ["# Configuration reference", "",
             "Generated by `rabo config --markdown` from `rabo/config.py`; do not edit by hand.",
             "Keys tagged [recon] are reconstructions of the paper (see docs/method.md).", "",
             "| key | type | default | meaning |", "|---|---|---|---|"]
    bar, escaped = "|", "\\|"
    for key, tp, default, help_ in describe():
        lines.append(f"| `{key}` | {tp.replace(bar, escaped)} | `{default}` | "
                     f"{help_.replace(bar, escaped)} |")
    return "\n".join(lines) + "\n"
