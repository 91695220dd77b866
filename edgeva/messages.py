"""The records that flow between pipeline steps: source → filter → router → executor → tasks → sinks."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded picture from a camera, stamped at capture."""

    camera: str
    seq: int                 # per-camera, increasing from 0, gaps mean drops upstream of the reader
    t_capture: float         # wall clock (time.time()) at capture, for records
    t_mono: float            # time.monotonic() at capture, for latency and deadlines
    image: np.ndarray        # BGR, HxWx3, uint8
    t_media: float | None = None   # seconds into the recording (file sources), for batch replay's clock
    clip: str | None = None        # the file it came from, when a camera plays a folder of recordings

    @property
    def frame_id(self) -> str:
        return f"{self.camera}:{self.seq}"


class Outcome(str, enum.Enum):
    """The bucket a delivered frame ends in, per query. Exactly one per frame and query."""

    INFERRED = "inferred"
    REUSED = "reused"
    OFFLOADED = "offloaded"
    DROPPED = "dropped"


class DropReason(str, enum.Enum):
    BUFFER_FULL = "buffer-full"      # camera buffer overflowed; the oldest frame went
    QUEUE_FULL = "queue-full"        # the query's executor queue was full
    DEADLINE = "deadline"            # it could not be processed before its SLA deadline
    TIER_DOWN = "tier-down"          # offload target unreachable and fallback is drop
    SHUTDOWN = "shutdown"            # still queued when the daemon stopped
    ERROR = "error"                  # the model or task raised on it


@dataclass(slots=True)
class QueryResult:
    """One record per query per frame: inferred, reused, offloaded, or dropped (`extra["reason"]`)."""

    query: str
    camera: str
    seq: int
    t_capture: float
    outcome: Outcome
    value: Any                       # task output: a count dict, boxes, a label...
    latency_s: float                 # capture to result
    age_frames: int = 0              # for reused results: frames since the inferred one
    source_seq: int | None = None    # seq of the frame whose inference produced `value`
    extra: dict[str, Any] = field(default_factory=dict)   # "reason" of a drop, "tier" of an offload
    clip: str | None = None          # the recording, for a camera playing a folder
    t_media: float | None = None     # seconds into the recording (file sources)

    @classmethod
    def of(cls, query: str, frame: Frame, outcome: Outcome, value: Any, latency_s: float, age_frames: int = 0,
           source_seq: int | None = None, extra: dict[str, Any] | None = None) -> "QueryResult":
        return cls(query, frame.camera, frame.seq, frame.t_capture, outcome, value, latency_s, age_frames,
                   source_seq, extra or {}, frame.clip, frame.t_media)

    @property
    def reason(self) -> str | None:
        return self.extra.get("reason")

    def to_dict(self) -> dict[str, Any]:
        media = {k: v for k, v in (("clip", self.clip), ("t_media", self.t_media)) if v is not None}
        return {
            "query": self.query, "camera": self.camera, "seq": self.seq,
            "t_capture": self.t_capture, "outcome": self.outcome.value, "value": self.value,
            "latency_ms": round(self.latency_s * 1000.0, 3), "age_frames": self.age_frames,
            "source_seq": self.source_seq, **media, **self.extra,
        }
