"""The offload wire protocol: every message is exactly two ZeroMQ frames, [header JSON][payload].

Requests (daemon → worker):
  infer        payload: one frame, encoded as `frame.encoding` (jpeg | png | raw uint8 HxWx3)
  infer_split  payload: the activations after the first `split_at` blocks (raw tensor, `tensor` spec)
  ping         payload empty; answered with a `result` whose header carries `info`
  heartbeat    payload empty; answered with a `heartbeat`
Replies (worker → daemon):
  result       payload: the model's raw output (Detections / ClassProbs) as arrays laid out in
               `output.arrays` ({name, dtype, shape, offset}); the daemon's task post-processing
               stays local, so an offloaded frame gives the same query result as a local one
  error        payload empty; {code, message, retryable}; the answer to anything malformed
  heartbeat    payload empty

Headers always carry `v` (the protocol version), `kind` and `id` (the request's id, echoed back).
A ROUTER in front adds the client's routing id; `split_envelope` removes it (and REQ's delimiter).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import cv2
import numpy as np

from edgeva.models.outputs import ClassProbs, Detections, Output

VERSION = 1
MAX_HEADER_BYTES = 16 * 1024
MAX_ID_CHARS = 128
MAX_DIMS = 6
MAX_DIM = 1 << 16
MAX_FRAME_PIXELS = 1 << 26          # 8192 x 8192: far above any camera, far below a decompression bomb
ALLOWED_DTYPES = ("uint8", "int32", "int64", "float16", "float32", "float64")
FRAME_ENCODINGS = ("jpeg", "png", "raw")


class ErrorCode:
    BAD_REQUEST = "bad-request"
    UNSUPPORTED_VERSION = "unsupported-version"
    UNKNOWN_KIND = "unknown-kind"
    TOO_LARGE = "too-large"
    MODEL_UNAVAILABLE = "model-unavailable"
    BUSY = "busy"
    DEADLINE = "deadline"
    SHUTTING_DOWN = "shutting-down"
    INTERNAL = "internal"

    RETRYABLE = frozenset({BUSY, SHUTTING_DOWN})


class ProtocolError(ValueError):
    """A message that does not follow the protocol; `code` is what the error reply says."""

    def __init__(self, code: str, message: str, request_id: str = ""):
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


# ----------------------------------------------------------------------------- arrays

@dataclass(frozen=True)
class ArraySpec:
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize * math.prod(self.shape))

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def of(cls, array: np.ndarray) -> "ArraySpec":
        return cls(array.dtype.name, tuple(int(d) for d in array.shape))

    @classmethod
    def from_json(cls, obj: Any, what: str) -> "ArraySpec":
        if not isinstance(obj, dict):
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{what} must be an object with dtype and shape")
        dtype, shape = obj.get("dtype"), obj.get("shape")
        if dtype not in ALLOWED_DTYPES:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{what}.dtype {dtype!r} is not one of {ALLOWED_DTYPES}")
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in shape)):
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"{what}.shape must be a list of at most {MAX_DIMS} ints in [0, {MAX_DIM}]")
        return cls(dtype, tuple(shape))


def array_from_bytes(data: bytes | memoryview, spec: ArraySpec, what: str) -> np.ndarray:
    if len(data) != spec.nbytes:
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f"{what}: {spec.dtype}{list(spec.shape)} needs {spec.nbytes} bytes, got {len(data)}")
    # Little-endian on the wire whatever the host; copy so the result owns writable memory.
    return np.frombuffer(data, dtype=np.dtype(spec.dtype).newbyteorder("<")).reshape(spec.shape).astype(
        spec.dtype, copy=True)


def array_to_bytes(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


# ----------------------------------------------------------------------------- frames

@dataclass(frozen=True)
class FrameEncoding:
    """How the daemon sends a frame: jpeg (lossy, small), png (lossless) or raw pixels."""

    name: str = "jpeg"
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        if self.name not in FRAME_ENCODINGS:
            raise ValueError(f"frame encoding must be one of {FRAME_ENCODINGS}, got {self.name!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError("jpeg_quality must be within [1, 100]")


def encode_frame(image: np.ndarray, encoding: FrameEncoding) -> tuple[dict[str, Any], bytes]:
    """(header `frame` field, payload) for a BGR uint8 HxWx3 image."""
    shape = [int(d) for d in image.shape]
    if encoding.name == "raw":
        return {"encoding": "raw", "shape": shape}, np.ascontiguousarray(image).tobytes()
    if encoding.name == "jpeg":
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, encoding.jpeg_quality])
    else:
        ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError(f"cv2 could not encode a {shape} frame as {encoding.name}")
    return {"encoding": encoding.name, "shape": shape}, buf.tobytes()


def decode_frame(meta: Any, payload: bytes) -> np.ndarray:
    if not isinstance(meta, dict) or meta.get("encoding") not in FRAME_ENCODINGS:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"frame.encoding must be one of {FRAME_ENCODINGS}")
    shape = meta.get("shape")
    if (not isinstance(shape, list) or len(shape) != 3 or shape[2:] != [3]
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= MAX_DIM for d in shape)):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "frame.shape must be [height, width, 3]")
    if shape[0] * shape[1] > MAX_FRAME_PIXELS:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"a {shape[0]}x{shape[1]} frame is over the "
                                                 f"{MAX_FRAME_PIXELS} pixel limit")
    if meta["encoding"] == "raw":
        return array_from_bytes(payload, ArraySpec("uint8", tuple(shape)), "raw frame")
    declared = encoded_image_size(payload)
    if declared is not None and declared != (shape[0], shape[1]):
        # Checked before decoding: a few bytes of PNG can claim gigapixels (a decompression bomb).
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"image is {declared[0]}x{declared[1]}, header says "
                                                   f"{shape[0]}x{shape[1]}")
    image = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR) if payload else None
    if image is None:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"payload is not a decodable {meta['encoding']} image")
    if list(image.shape) != shape:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"decoded image is {list(image.shape)}, header says {shape}")
    return image


def encoded_image_size(payload: bytes) -> Optional[tuple[int, int]]:
    """(height, width) a PNG or JPEG says it has, read from its header without decoding;
    None when the header cannot be read (cv2 then refuses the payload anyway)."""
    if payload[:8] == b"\x89PNG\r\n\x1a\n" and len(payload) >= 24 and payload[12:16] == b"IHDR":
        return int.from_bytes(payload[20:24], "big"), int.from_bytes(payload[16:20], "big")
    if payload[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 < len(payload):
        if payload[i] != 0xFF:
            return None
        marker = payload[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:   # markers without a length
            i += 2
            continue
        length = int.from_bytes(payload[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):   # start of frame
            return int.from_bytes(payload[i + 5:i + 7], "big"), int.from_bytes(payload[i + 7:i + 9], "big")
        i += 2 + length
    return None


# ----------------------------------------------------------------------------- outputs

def encode_output(output: Output) -> tuple[dict[str, Any], bytes]:
    """(header `output` field, payload): the arrays of one model output, back to back."""
    if isinstance(output, Detections):
        kind, arrays = "detections", {"boxes": output.boxes.astype(np.float32), "scores": output.scores.astype(np.float32),
                                      "class_ids": output.class_ids.astype(np.int64)}
    elif isinstance(output, ClassProbs):
        kind, arrays = "class_probs", {"probs": output.probs.astype(np.float32)}
    else:
        raise TypeError(f"cannot serialise a {type(output).__name__} output")
    specs, chunks, offset = [], [], 0
    for name, array in arrays.items():
        data = array_to_bytes(array)
        specs.append({"name": name, **ArraySpec.of(array).to_json(), "offset": offset})
        chunks.append(data)
        offset += len(data)
    return {"type": kind, "arrays": specs}, b"".join(chunks)


def decode_output(meta: Any, payload: bytes) -> Output:
    if not isinstance(meta, dict) or meta.get("type") not in ("detections", "class_probs"):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "output.type must be detections or class_probs")
    arrays: dict[str, np.ndarray] = {}
    if not isinstance(meta.get("arrays"), list):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "output.arrays must be a list")
    for entry in meta["arrays"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "output.arrays entries need a name")
        spec = ArraySpec.from_json(entry, f"output.{entry['name']}")
        offset = entry.get("offset")
        if not isinstance(offset, int) or offset < 0 or offset + spec.nbytes > len(payload):
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"output.{entry['name']} lies outside the payload")
        arrays[entry["name"]] = array_from_bytes(memoryview(payload)[offset:offset + spec.nbytes], spec,
                                                 f"output.{entry['name']}")
    try:
        if meta["type"] == "detections":
            return Detections(arrays["boxes"], arrays["scores"], arrays["class_ids"])
        return ClassProbs(arrays["probs"])
    except (KeyError, ValueError, TypeError) as exc:   # TypeError: e.g. 0-d arrays have no len()
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"output arrays do not form a {meta['type']}: {exc}") from None


# ----------------------------------------------------------------------------- model keys

@dataclass(frozen=True)
class ModelKey:
    """What the worker must load: a zoo name plus a weights path ("init": random weights).

    Its text form "name@weights" is the daemon's own model key (`edgeva.config.model_key`).
    """

    name: str
    weights: Optional[str] = None

    @property
    def text(self) -> str:
        return f"{self.name}@{self.weights or 'init'}"

    @classmethod
    def parse(cls, text: Any) -> "ModelKey":
        if not isinstance(text, str) or not text or len(text) > 4096:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "model must be a non-empty string 'name[@weights]'")
        name, _, weights = text.partition("@")
        if not name:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"model {text!r} has no name")
        return cls(name, None if weights in ("", "init") else weights)


# ----------------------------------------------------------------------------- messages

@dataclass
class InferRequest:
    id: str
    model: ModelKey
    frame: dict[str, Any]                  # {"encoding", "shape"}
    payload: bytes
    budget_ms: Optional[float] = None      # how long the worker may keep it queued
    kind = "infer"

    def header(self) -> dict[str, Any]:
        return {"model": self.model.text, "frame": self.frame, "budget_ms": self.budget_ms}


@dataclass
class SplitRequest:
    id: str
    model: ModelKey
    split_at: int                          # the worker runs blocks [split_at:]
    tensor: ArraySpec
    payload: bytes
    budget_ms: Optional[float] = None
    kind = "infer_split"

    def header(self) -> dict[str, Any]:
        return {"model": self.model.text, "split_at": self.split_at, "tensor": self.tensor.to_json(),
                "budget_ms": self.budget_ms}


@dataclass
class Ping:
    id: str
    kind = "ping"
    payload = b""

    def header(self) -> dict[str, Any]:
        return {}


@dataclass
class Heartbeat:
    id: str = ""
    kind = "heartbeat"
    payload = b""

    def header(self) -> dict[str, Any]:
        return {}


@dataclass
class Result:
    id: str
    output: dict[str, Any] = field(default_factory=dict)   # {"type", "arrays"}; empty for a ping's answer
    payload: bytes = b""
    info: Optional[dict[str, Any]] = None
    worker: str = ""
    queue_ms: float = 0.0
    infer_ms: float = 0.0
    kind = "result"

    def header(self) -> dict[str, Any]:
        h: dict[str, Any] = {"worker": self.worker, "queue_ms": round(self.queue_ms, 3),
                             "infer_ms": round(self.infer_ms, 3)}
        if self.output:
            h["output"] = self.output
        if self.info is not None:
            h["info"] = self.info
        return h

    def decoded_output(self) -> Output:
        return decode_output(self.output, self.payload)


@dataclass
class ErrorReply:
    id: str
    code: str
    message: str
    retryable: bool = False
    kind = "error"
    payload = b""

    def header(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "retryable": self.retryable}

    @classmethod
    def from_exception(cls, exc: ProtocolError) -> "ErrorReply":
        return cls(exc.request_id, exc.code, exc.message, exc.code in ErrorCode.RETRYABLE)


Message = Union[InferRequest, SplitRequest, Ping, Heartbeat, Result, ErrorReply]
REQUEST_KINDS = ("infer", "infer_split", "ping", "heartbeat")
REPLY_KINDS = ("result", "error", "heartbeat")


def encode(message: Message) -> list[bytes]:
    header = {"v": VERSION, "kind": message.kind, "id": message.id, **message.header()}
    return [json.dumps(header, separators=(",", ":")).encode(), bytes(message.payload)]


def split_envelope(frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """ROUTER side: (routing envelope to send back with, message frames)."""
    identity, rest = frames[:1], frames[1:]
    if rest and rest[0] == b"":          # a REQ client adds an empty delimiter
        return identity + [b""], rest[1:]
    return identity, rest


def decode(frames: list[bytes], max_payload_bytes: int, accept: tuple[str, ...]) -> Message:
    """Parse and validate one message; raises ProtocolError naming what is wrong."""
    if len(frames) != 2:
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f"a message is exactly 2 frames [header JSON][payload], got {len(frames)}")
    raw_header, payload = frames
    if len(raw_header) > MAX_HEADER_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"header of {len(raw_header)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = json.loads(bytes(raw_header).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "header must be a JSON object")
    request_id = header.get("id", "")
    if not isinstance(request_id, str) or len(request_id) > MAX_ID_CHARS:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"id must be a string of at most {MAX_ID_CHARS} chars")
    if header.get("v") != VERSION:
        raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION,
                            f"protocol version {header.get('v')!r} is not supported (this side speaks {VERSION})",
                            request_id)
    kind = header.get("kind")
    if kind not in accept:
        raise ProtocolError(ErrorCode.UNKNOWN_KIND, f"unknown kind {kind!r}; expected one of {', '.join(accept)}",
                            request_id)
    if len(payload) > max_payload_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE,
                            f"payload of {len(payload)} bytes exceeds the limit of {max_payload_bytes}", request_id)
    try:
        return _build(kind, request_id, header, bytes(payload))
    except ProtocolError as exc:
        exc.request_id = request_id
        raise


def _build(kind: str, request_id: str, header: dict[str, Any], payload: bytes) -> Message:
    if kind in ("ping", "heartbeat") and payload:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"a {kind} carries an empty payload")
    if kind == "ping":
        return Ping(request_id)
    if kind == "heartbeat":
        return Heartbeat(request_id)
    if kind == "error":
        return ErrorReply(request_id, str(header.get("code", ErrorCode.INTERNAL)), str(header.get("message", "")),
                          bool(header.get("retryable", False)))
    if kind == "result":
        info = header.get("info")
        return Result(request_id, header.get("output") or {}, payload, info if isinstance(info, dict) else None,
                      str(header.get("worker", "")), _number(header.get("queue_ms"), 0.0),
                      _number(header.get("infer_ms"), 0.0))
    if not request_id:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"an {kind} request needs a non-empty id")
    model = ModelKey.parse(header.get("model"))
    budget = header.get("budget_ms")
    if budget is not None and (not isinstance(budget, (int, float)) or isinstance(budget, bool)
                               or not math.isfinite(budget) or budget < 0):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "budget_ms must be a finite non-negative number or null")
    if kind == "infer":
        frame = header.get("frame")
        decode_frame_meta_only(frame)
        return InferRequest(request_id, model, frame, payload, budget)
    split_at = header.get("split_at")
    if not isinstance(split_at, int) or isinstance(split_at, bool) or split_at < 0:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "split_at must be a non-negative int")
    tensor = ArraySpec.from_json(header.get("tensor"), "tensor")
    if tensor.nbytes != len(payload):
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f"tensor {tensor.dtype}{list(tensor.shape)} needs {tensor.nbytes} bytes, got {len(payload)}")
    return SplitRequest(request_id, model, split_at, tensor, payload, budget)


def decode_frame_meta_only(meta: Any) -> None:
    if not isinstance(meta, dict) or meta.get("encoding") not in FRAME_ENCODINGS:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"frame.encoding must be one of {FRAME_ENCODINGS}")


def _number(value: Any, default: float) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default
