"""Typed schema of the YAML config and its validation.

Every section is a dataclass; `load_config` converts the parsed YAML into them
field by field and raises `ConfigError` naming the key path (``queries[2].task.type``)
and the reason. Cross-references (a query's camera, a tier name) are checked after
the structural pass, so the first error reported is the most local one.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from edgeva.recordings import VIDEO_EXTENSIONS, list_recordings
from edgeva.redaction import redact
from edgeva.source_kind import SourceKind, classify_source


class ConfigError(ValueError):
    """A config problem, located by its dotted key path."""

    def __init__(self, path: str, reason: str):
        self.path = path or "<root>"
        self.reason = redact(reason)   # a YAML or source error may quote a camera URL with its password
        super().__init__(f"config error at {self.path}: {self.reason}")


# --------------------------------------------------------------------- schema

@dataclass
class Backoff:
    initial_s: float = 0.5
    max_s: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.1

    def validate(self, path: str) -> None:
        _positive(self.initial_s, f"{path}.initial_s")
        _positive(self.max_s, f"{path}.max_s")
        if self.multiplier < 1.0:
            raise ConfigError(f"{path}.multiplier", "must be >= 1")
        if not 0.0 <= self.jitter <= 1.0:
            raise ConfigError(f"{path}.jitter", "must be within [0, 1]")


@dataclass
class CameraConfig:
    id: str
    source: str
    # realtime: paced to the file's fps; fast: as fast as the pipeline takes frames.
    replay: Literal["realtime", "fast"] = "realtime"
    loop: bool = False
    fps: Optional[float] = None          # override when the container lies
    buffer: int = 8                      # frames held between reader and pipeline
    resize: Optional[list[int]] = None   # [width, height] applied at capture
    reconnect: Backoff = field(default_factory=Backoff)
    open_timeout_s: float = 10.0
    read_timeout_s: float = 5.0
    enabled: bool = True
    # auto: NVDEC when a CUDA device and torchcodec/PyNvVideoCodec are present, else OpenCV.
    decode: Literal["auto", "cpu", "cuda"] = "auto"

    @property
    def batch(self) -> bool:
        """A recording replayed as fast as the models go: batch processing, no deadlines. Live
        sources (streams, USB) keep their deadlines whatever `replay` says."""
        return self.replay == "fast" and classify_source(self.source) is SourceKind.FILE

    def validate(self, path: str) -> None:
        _identifier(self.id, f"{path}.id")
        if not self.source:
            raise ConfigError(f"{path}.source", "must not be empty")
        try:
            classify_source(self.source)
        except ValueError as exc:
            raise ConfigError(f"{path}.source", str(exc)) from None
        if self.fps is not None:
            _positive(self.fps, f"{path}.fps")
        if self.buffer < 1:
            raise ConfigError(f"{path}.buffer", "must be >= 1")
        if self.resize is not None and (len(self.resize) != 2 or min(self.resize) < 8):
            raise ConfigError(f"{path}.resize", "must be [width, height], each >= 8")
        _positive(self.open_timeout_s, f"{path}.open_timeout_s")
        _positive(self.read_timeout_s, f"{path}.read_timeout_s")
        self.reconnect.validate(f"{path}.reconnect")


@dataclass
class TaskConfig:
    type: Literal["passthrough", "count", "detect", "classify", "presence"] = "passthrough"
    classes: list[Union[str, int]] = field(default_factory=list)
    confidence: float = 0.25

    def validate(self, path: str) -> None:
        if not 0.0 <= self.confidence <= 1.0:
            raise ConfigError(f"{path}.confidence", "must be within [0, 1]")
        if self.type in ("count", "presence") and not self.classes:
            raise ConfigError(f"{path}.classes", f"a {self.type} task needs at least one class")


# Bins of a segment's key (edgeva.filtering.profiles): a histogram of its frame-to-frame changes.
SEGMENT_KEY_BINS = 30


@dataclass
class TunedFilter:
    """Where a query's filter starts, written by `edgeva tune --write`: the setting tuned on a
    profiled segment of the camera and that segment's key. The query learns on from there as one
    without a threshold does after its first window (the segment is its first profile)."""
    feature: Literal["pixel", "area", "edge", "foreground"]
    threshold: float                     # .inf: only the staleness bound
    max_age_s: float
    key: list[float]                     # the segment's histogram of frame-to-frame changes
    radius: float                        # how far the segment's own pieces were from its key
    informed: bool = True                # the segment's answer changed enough to tell settings apart
    seconds: Optional[float] = None      # how much of the camera it was tuned on (for the reader)

    def validate(self, path: str) -> None:
        if self.threshold < 0:
            raise ConfigError(f"{path}.threshold", "must be >= 0")
        if self.max_age_s < 0:
            raise ConfigError(f"{path}.max_age_s", "must be >= 0")
        if self.radius < 0:
            raise ConfigError(f"{path}.radius", "must be >= 0")
        if len(self.key) != SEGMENT_KEY_BINS or any(v < 0 for v in self.key) or abs(sum(self.key) - 1.0) > 0.01:
            raise ConfigError(f"{path}.key", f"must be {SEGMENT_KEY_BINS} shares >= 0 summing to 1 "
                              "(as `edgeva tune --write` writes it)")


@dataclass
class FilterConfig:
    enabled: bool = True
    feature: Literal["auto", "pixel", "area", "edge", "foreground"] = "auto"   # auto: the tuner picks
    threshold: Optional[float] = None    # None: calibrate on the camera (infer densely, tune, then filter)
    max_age_s: Optional[float] = None    # staleness bound; None: chosen by the tuner (at most tuned_max_age_limit_s)
    max_skip: Optional[int] = None       # optional hard cap on reuses in frames (older configs)
    width: int = 160                     # downscaled width the features use
    audit_fraction: Optional[float] = None   # None: sized for statistical power
    calibration_s: float = 3.0           # window a profile is tuned on
    calibration_stride: int = 8          # a later window infers at most every n-th frame while the answer holds (1: all; the first infers all)
    segment_s: float = 1.0               # how often the recent segment is looked up among the profiles
    recalibrate_s: float = 300.0         # a calibration burst at least this often
    tuned_max_age_limit_s: float = 10.0  # the longest staleness bound the tuner may choose
    tuned: Optional[TunedFilter] = None  # `edgeva tune --write`: where the filter starts (it learns on)
    # answer a skipped frame once the next kept frame's result is in; None: on for a recording
    # replayed fast (CameraConfig.batch), off for a live camera (its results cannot wait)
    look_ahead: Optional[bool] = None

    def validate(self, path: str) -> None:
        if self.threshold is not None and self.threshold < 0:
            raise ConfigError(f"{path}.threshold", "must be >= 0")
        if self.max_skip is not None and self.max_skip < 0:
            raise ConfigError(f"{path}.max_skip", "must be >= 0")
        if self.width < 16:
            raise ConfigError(f"{path}.width", "must be >= 16")
        if self.audit_fraction is not None and not 0.0 <= self.audit_fraction <= 1.0:
            raise ConfigError(f"{path}.audit_fraction", "must be within [0, 1]")
        if self.max_age_s is not None and self.max_age_s < 0:
            raise ConfigError(f"{path}.max_age_s", "must be >= 0")
        if self.calibration_stride < 1:
            raise ConfigError(f"{path}.calibration_stride", "must be >= 1 (1: a window infers every frame)")
        for name in ("calibration_s", "segment_s", "recalibrate_s", "tuned_max_age_limit_s"):
            _positive(getattr(self, name), f"{path}.{name}")
        if self.segment_s > self.calibration_s:
            raise ConfigError(f"{path}.segment_s", f"must be at most calibration_s ({self.calibration_s}): "
                              "a calibration window is cut into segments to judge what is new")
        if self.recalibrate_s < self.calibration_s:
            raise ConfigError(f"{path}.recalibrate_s", f"must be at least calibration_s ({self.calibration_s})")
        if self.tuned is not None:
            if self.threshold is not None:
                raise ConfigError(f"{path}.tuned", "a configured threshold is fixed and a tuned setting is where "
                                  "learning starts: keep one (`edgeva tune --write` removes the threshold)")
            if self.feature != "auto" and self.tuned.feature != self.feature:
                raise ConfigError(f"{path}.tuned.feature", f"{self.tuned.feature!r} is not the configured "
                                  f"feature {self.feature!r}: run `edgeva tune --write` again")
            self.tuned.validate(f"{path}.tuned")


def looks_ahead(filt: FilterConfig, camera: CameraConfig) -> bool:
    """Whether the query answers a skipped frame from both ends of its gap (edgeva.gaps): as
    configured, or by default on a recording replayed fast and off on a live camera."""
    return camera.batch if filt.look_ahead is None else filt.look_ahead


@dataclass
class SLAConfig:
    fps: Optional[float] = None
    latency_ms: float = 1000.0

    def validate(self, path: str) -> None:
        if self.fps is not None:
            _positive(self.fps, f"{path}.fps")
        _positive(self.latency_ms, f"{path}.latency_ms")


@dataclass
class QueryConfig:
    id: str
    camera: str
    model: Optional[str] = None          # zoo name; None only for passthrough
    weights: Optional[str] = None        # checkpoint path (or library name with download: true)
    download: bool = False               # allow the library's own name-based download
    task: TaskConfig = field(default_factory=TaskConfig)
    accuracy_target: float = 0.9
    sla: SLAConfig = field(default_factory=SLAConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    # 'local', a tier name or a list of tiers (load spread over the live ones); None: follow the plan
    placement: Optional[Union[str, list[str]]] = None
    # With a tier: run the model here up to this split point (a layer name as `edgeva profile`
    # and plan files name it, or the number of layers before the cut; edgeva.models.splits).
    split_at: Optional[Union[int, str]] = None
    queue: int = 16                      # frames waiting for the executor
    # network input side in pixels (classifiers: the square; detectors: the long side); None:
    # the model's own. Part of what a merged bundle was checked at.
    input_size: Optional[int] = None

    def validate(self, path: str) -> None:
        _identifier(self.id, f"{path}.id")
        if not 0.0 < self.accuracy_target <= 1.0:
            raise ConfigError(f"{path}.accuracy_target", "must be within (0, 1]")
        if self.task.type != "passthrough" and not self.model:
            raise ConfigError(f"{path}.model", f"a {self.task.type} task needs a model")
        if self.queue < 1:
            raise ConfigError(f"{path}.queue", "must be >= 1")
        if self.input_size is not None and not 16 <= self.input_size <= 4096:
            raise ConfigError(f"{path}.input_size", "must be within [16, 4096] pixels")
        self.task.validate(f"{path}.task")
        self.sla.validate(f"{path}.sla")
        self.filter.validate(f"{path}.filter")


def model_key(q: QueryConfig) -> str:
    """Queries with the same model and weights share one loaded model (and merged bundles and
    offload workers name models by this key)."""
    return f"{q.model}@{q.weights or 'init'}"


@dataclass
class GPUConfig:
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    memory_budget_mb: Optional[float] = None   # set: models time-share this much device memory
    max_batch: int = 8
    # Without CUDA the budget is enforced by edgeva's own accounting and host-to-device
    # copies are simulated at this bandwidth, so swapping behaves (and is testable) as on a GPU.
    simulated_bandwidth_gbps: float = 12.0
    # Per model at load: reduced precision (autocast) is kept only when its outputs agree with
    # float32 on calibration frames at least this well. auto: fp16 on CUDA, fp32 on the CPU.
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    precision_min_agreement: float = 0.98

    def validate(self, path: str) -> None:
        d = self.device
        ok = d in ("auto", "cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit())
        if not ok:
            raise ConfigError(f"{path}.device", f"must be auto, cpu, cuda or cuda:N, not {d!r}")
        if self.memory_budget_mb is not None:
            _positive(self.memory_budget_mb, f"{path}.memory_budget_mb")
        if self.max_batch < 1:
            raise ConfigError(f"{path}.max_batch", "must be >= 1")
        _positive(self.simulated_bandwidth_gbps, f"{path}.simulated_bandwidth_gbps")
        if not 0.0 <= self.precision_min_agreement <= 1.0:
            raise ConfigError(f"{path}.precision_min_agreement", "must be within [0, 1]")


@dataclass
class TierConfig:
    name: str
    endpoint: str
    server_public_key: Optional[str] = None   # CurveZMQ: the worker's public key file
    client_secret_key: Optional[str] = None   # CurveZMQ: this daemon's secret key file (edgeva keys)
    timeout_ms: int = 2000
    retries: int = 1
    credit: int = 8                           # requests in flight to this tier at most
    heartbeat_ms: int = 500
    encoding: Literal["jpeg", "png", "raw"] = "jpeg"
    jpeg_quality: int = 90

    def validate(self, path: str) -> None:
        _identifier(self.name, f"{path}.name")
        _zmq_endpoint(self.endpoint, f"{path}.endpoint")
        _positive(self.timeout_ms, f"{path}.timeout_ms")
        _positive(self.heartbeat_ms, f"{path}.heartbeat_ms")
        _positive(self.credit, f"{path}.credit")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"{path}.jpeg_quality", "must be within [1, 100]")
        if (self.server_public_key is None) != (self.client_secret_key is None):
            raise ConfigError(f"{path}.client_secret_key" if self.client_secret_key is None
                              else f"{path}.server_public_key", "CurveZMQ needs both server_public_key and "
                                                                "client_secret_key")


@dataclass
class PlacementConfig:
    hierarchy: Optional[str] = None      # the hierarchy file `edgeva plan` reads (needed for plan: auto)
    plan: str = "local"                  # local | auto (solve the hierarchy at start) | path to a plan file
    node: Optional[str] = None           # this box's node in the hierarchy; default: each query's source
    fallback: Literal["local", "drop"] = "local"   # when a tier is down: run here, or drop (tier-down)


@dataclass
class StatsConfig:
    endpoint: str = "ipc://{runtime_dir}/control.sock"
    log_interval_s: float = 60.0
    max_request_bytes: int = 64 * 1024
    prometheus: Optional[str] = None     # "host:port" to serve /metrics, e.g. 127.0.0.1:9108

    def validate(self, path: str) -> None:
        _zmq_endpoint(self.endpoint, f"{path}.endpoint")
        if self.max_request_bytes < 64:
            raise ConfigError(f"{path}.max_request_bytes", "must be >= 64")
        if self.prometheus is not None:
            host, sep, port = self.prometheus.rpartition(":")
            if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
                raise ConfigError(f"{path}.prometheus", f"expected host:port, got {self.prometheus!r}")
        _positive(self.log_interval_s, f"{path}.log_interval_s")


@dataclass
class SinksConfig:
    sqlite: Optional[str] = None
    retention_days: Optional[float] = 30.0   # older results are deleted from SQLite; null keeps all
    zmq_pub: Optional[str] = None
    batch: int = 64
    flush_s: float = 1.0

    def validate(self, path: str) -> None:
        if self.zmq_pub is not None:
            _zmq_endpoint(self.zmq_pub, f"{path}.zmq_pub")
        if self.batch < 1:
            raise ConfigError(f"{path}.batch", "must be >= 1")
        _positive(self.flush_s, f"{path}.flush_s")
        if self.retention_days is not None:
            _positive(self.retention_days, f"{path}.retention_days")


@dataclass
class MergingConfig:
    bundle: Optional[str] = None         # a merged bundle from `edgeva merge`: its models replace the built ones


@dataclass
class Config:
    cameras: list[CameraConfig] = field(default_factory=list)
    queries: list[QueryConfig] = field(default_factory=list)
    gpu: GPUConfig = field(default_factory=GPUConfig)
    tiers: list[TierConfig] = field(default_factory=list)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    sinks: SinksConfig = field(default_factory=SinksConfig)
    merging: MergingConfig = field(default_factory=MergingConfig)
    # A folder of fetched weights (tools/setup.sh): a query without `weights:` uses
    # <weights_dir>/<model>.pt or .pth when it is there, else random weights (with a warning).
    weights_dir: Optional[str] = None
    source_path: Optional[str] = None    # set by load_config, not read from YAML

    def camera(self, camera_id: str) -> CameraConfig:
        for cam in self.cameras:
            if cam.id == camera_id:
                return cam
        raise KeyError(camera_id)

    def queries_for(self, camera_id: str) -> list[QueryConfig]:
        return [q for q in self.queries if q.camera == camera_id]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------- loading

def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, convert and validate a YAML config file; raise ConfigError on any problem."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("<file>", f"cannot read {p}: {exc.strerror or exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None)
        raise ConfigError("<file>", f"{p} is not valid YAML{where}" + (f": {problem}" if problem else "")) from None
    cfg = parse_config(raw if raw is not None else {}, base_dir=p.parent)
    cfg.source_path = str(p.resolve())
    return cfg


def parse_config(raw: Any, base_dir: Path | None = None) -> Config:
    """Convert an already-parsed mapping into a validated Config."""
    if not isinstance(raw, dict):
        raise ConfigError("", f"expected a mapping at the top level, got {_kind(raw)}")
    if "source_path" in raw:
        raise ConfigError("source_path", "unknown key")
    cfg = _convert(raw, Config, "")
    _validate(cfg, base_dir)
    return cfg


def _validate(cfg: Config, base_dir: Path | None) -> None:
    _unique([c.id for c in cfg.cameras], "cameras", "id")
    _unique([q.id for q in cfg.queries], "queries", "id")
    _unique([t.name for t in cfg.tiers], "tiers", "name")
    for i, cam in enumerate(cfg.cameras):
        cam.validate(f"cameras[{i}]")
        if is_file_source(cam.source) and base_dir is not None:
            cam.source = _readable_file(cam.source, base_dir, f"cameras[{i}].source", allow_dir=True)
            if os.path.isdir(cam.source) and not list_recordings(cam.source):
                raise ConfigError(f"cameras[{i}].source", f"folder {cam.source} holds no video files "
                                                          f"({', '.join(sorted(VIDEO_EXTENSIONS))})")
    cameras = {c.id: c for c in cfg.cameras}
    tier_names = {t.name for t in cfg.tiers} | {"local"}
    if cfg.weights_dir:
        _weights_folder(cfg.weights_dir, base_dir)
    for i, q in enumerate(cfg.queries):
        q.validate(f"queries[{i}]")
        if q.camera not in cameras:
            known = ", ".join(sorted(cameras)) or "none defined"
            raise ConfigError(f"queries[{i}].camera", f"unknown camera {q.camera!r} (cameras: {known})")
        if q.filter.look_ahead and not cameras[q.camera].batch:
            raise ConfigError(f"queries[{i}].filter.look_ahead",
                              f"needs a recording replayed fast (camera {q.camera!r}: replay: fast, a file or "
                              "folder source): a live camera's results cannot wait for the next kept frame")
        for name in ([q.placement] if isinstance(q.placement, str) else q.placement or []):
            if name not in tier_names:
                raise ConfigError(f"queries[{i}].placement", f"unknown tier {name!r}")
        if q.split_at is not None and (q.split_at in (0, "input", "") or isinstance(q.split_at, bool)
                                       or (isinstance(q.split_at, int) and q.split_at < 0)):
            raise ConfigError(f"queries[{i}].split_at", "must be a layer name or an index >= 1 "
                                                        "(0 or 'input' is plain offload: leave it out)")
        if not q.weights and not q.download and q.model and cfg.weights_dir:
            q.weights = _fetched_weights(cfg.weights_dir, q.model, base_dir)
        if q.weights and not q.download and base_dir is not None:
            q.weights = _readable_file(q.weights, base_dir, f"queries[{i}].weights", allow_dir=True)
    _one_input_size_per_model(cfg.queries)
    cfg.gpu.validate("gpu")
    for i, t in enumerate(cfg.tiers):
        t.validate(f"tiers[{i}]")
    cfg.stats.validate("stats")
    cfg.sinks.validate("sinks")
    if base_dir is not None:
        for i, t in enumerate(cfg.tiers):
            for key in ("server_public_key", "client_secret_key"):
                if getattr(t, key):
                    setattr(t, key, _readable_file(getattr(t, key), base_dir, f"tiers[{i}].{key}"))
        if cfg.placement.hierarchy:
            cfg.placement.hierarchy = _readable_file(cfg.placement.hierarchy, base_dir, "placement.hierarchy")
        if cfg.placement.plan not in ("local", "auto"):
            cfg.placement.plan = _readable_file(cfg.placement.plan, base_dir, "placement.plan")
    if cfg.placement.plan == "auto" and not cfg.placement.hierarchy:
        raise ConfigError("placement.hierarchy", "plan: auto needs the hierarchy file")
    if cfg.merging.bundle and base_dir is not None:
        cfg.merging.bundle = _readable_file(cfg.merging.bundle, base_dir, "merging.bundle")
    if cfg.sinks.sqlite and base_dir is not None and not os.path.isabs(cfg.sinks.sqlite):
        cfg.sinks.sqlite = str((base_dir / cfg.sinks.sqlite).resolve())


def _one_input_size_per_model(queries: list[QueryConfig]) -> None:
    """Queries with the same model and weights run one loaded model, so one input size."""
    first: dict[tuple[Any, Any], tuple[int, QueryConfig]] = {}
    for i, q in enumerate(queries):
        if not q.model:
            continue
        j, other = first.setdefault((q.model, q.weights), (i, q))
        if other.input_size != q.input_size:
            raise ConfigError(f"queries[{i}].input_size",
                              f"query {q.id!r} runs {q.model} ({q.weights or 'no weights'}) at "
                              f"{q.input_size or 'its default'} px but query {other.id!r} runs the same model at "
                              f"{other.input_size or 'its default'} px; one loaded model has one input size")


def is_file_source(source: str) -> bool:
    """A camera source that names a video file (not a stream URL or a capture device)."""
    return "://" not in source and not source.startswith(("/dev/", "usb:")) and not source.isdigit()


def _weights_folder(weights_dir: str, base_dir: Path | None) -> Path:
    folder = Path(weights_dir) if os.path.isabs(weights_dir) or base_dir is None else base_dir / weights_dir
    if folder.exists() and not folder.is_dir():   # absent is fine (offline: random weights, said loudly)
        raise ConfigError("weights_dir", f"{folder} is a file, not a folder")
    return folder


def _fetched_weights(weights_dir: str, model: str, base_dir: Path | None) -> Optional[str]:
    """<weights_dir>/<model>.pt (ultralytics) or .pth (torchvision state dict), if fetched."""
    folder = _weights_folder(weights_dir, base_dir)
    for suffix in (".pt", ".pth"):
        candidate = folder / f"{model}{suffix}"
        if candidate.is_file():
            return str(candidate.resolve())
    return None


def _readable_file(value: str, base_dir: Path, path: str, allow_dir: bool = False) -> str:
    """Resolve a path relative to the config file's folder and check it can be read."""
    p = Path(value) if os.path.isabs(value) else (base_dir / value)
    p = p.resolve()
    if not p.exists():
        raise ConfigError(path, f"file not found: {p}")
    if p.is_dir() and not allow_dir:
        raise ConfigError(path, f"{p} is a folder, not a file")
    if not os.access(p, os.R_OK):
        raise ConfigError(path, f"{p} is not readable")
    return str(p)


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, path)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        names = " or ".join(_type_name(a) for a in args if a is not type(None))
        raise ConfigError(path, f"expected {names}, got {_kind(value)}")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(path, f"must be one of {choices}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(path, f"expected a list, got {_kind(value)}")
        return [_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {_kind(value)}")
        return {str(k): _convert(v, args[1], _join(path, str(k))) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {_kind(value)}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp) if f.name != "source_path"}
        for key in value:
            if key not in fields:
                close = [n for n in fields if n.startswith(str(key)[:3])]
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(_join(path, str(key)), f"unknown key{hint}")
        kwargs = {}
        for name, f in fields.items():
            if name in value:
                kwargs[name] = _convert(value[name], hints[name], _join(path, name))
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(_join(path, name), "missing required key")
        return tp(**kwargs)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {_kind(value)}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {_kind(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {_kind(value)}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {_kind(value)}")
        return value
    raise TypeError(f"unsupported schema type {tp!r} at {path}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _type_name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict:
        return "a mapping"
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}.get(tp, str(tp))


def _unique(values: list[str], section: str, key: str) -> None:
    seen: set[str] = set()
    for i, v in enumerate(values):
        if v in seen:
            raise ConfigError(f"{section}[{i}].{key}", f"duplicate {key} {v!r}")
        seen.add(v)


def _identifier(value: str, path: str) -> None:
    if not value or not all(ch.isalnum() or ch in "-_." for ch in value):
        raise ConfigError(path, f"{value!r} must be non-empty letters, digits, '-', '_' or '.'")


def _positive(value: float, path: str) -> None:
    if value <= 0:
        raise ConfigError(path, "must be > 0")


def _zmq_endpoint(value: str, path: str) -> None:
    if not value.startswith(("tcp://", "ipc://", "inproc://")):
        raise ConfigError(path, f"{value!r} is not a ZeroMQ endpoint (tcp://, ipc:// or inproc://)")
