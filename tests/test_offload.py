"""Offload over ZeroMQ: protocol, real worker processes on loopback, failover, CURVE, split execution."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import cv2
import numpy as np
import pytest
import torch
import zmq

from edgeva.executor import ModelWorker
from edgeva.work import WorkItem
from edgeva.messages import DropReason, Frame
from edgeva.models import ClassProbs, Detections, build_model
from edgeva.offload import OffloadClient, TierGroup, TierState, drop_fallback, keys_main, local_fallback
from edgeva.offload import protocol as p
from edgeva.offload.split import SplitModel

REPO = Path(__file__).resolve().parents[1]
MAX_PAYLOAD = 2_000_000


# ----------------------------------------------------------------------------- helpers

@dataclass
class Tier:
    """Stands in for config.TierConfig (same fields) plus the proposed client_secret_key."""

    name: str
    endpoint: str
    server_public_key: Optional[str] = None
    timeout_ms: int = 3000
    retries: int = 1
    credit: int = 4
    client_secret_key: Optional[str] = None


class WorkerProcess:
    """`python -m edgeva.offload.worker` on an ephemeral loopback port; stderr kept in a file."""

    def __init__(self, tmp: Path, name: str, *extra: str):
        self.log_path = tmp / f"{name}.log"
        self._log = open(self.log_path, "w")
        args = [sys.executable, "-m", "edgeva.offload.worker", "--bind", "tcp://127.0.0.1:0", "--name", name,
                "--threads", "1", "--max-payload-bytes", str(MAX_PAYLOAD), *extra]
        self.proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env={**os.environ, "PYTHONPATH": str(REPO)})
        self.endpoint = ""

    def wait_ready(self, timeout_s: float = 60.0) -> str:
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout_s)
        assert line and line[0].startswith("READY "), f"worker did not start: {self.log()}"
        self.endpoint = line[0].split()[1]
        return self.endpoint

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> Optional[int]:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


class Recorder:
    """A WorkOwner that records its one callback per item (and complains about a second)."""

    query_id = "q-test"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: dict[int, tuple[str, Any, Any]] = {}
        self.duplicates: list[int] = []
        self.done = threading.Condition(self.lock)

    def _record(self, item: WorkItem, kind: str, a: Any, b: Any = None) -> None:
        with self.done:
            if item.frame.seq in self.events:
                self.duplicates.append(item.frame.seq)
            self.events[item.frame.seq] = (kind, a, b)
            self.done.notify_all()

    def complete_offloaded(self, item: WorkItem, output: Any, finished_mono: float, tier: str) -> None:
        assert item.context == ("ctx", item.frame.seq)   # untouched
        self._record(item, "offloaded", output, tier)

    def complete(self, item: WorkItem, output: Any, finished_mono: float) -> None:
        self._record(item, "local", output)

    def dropped(self, item: WorkItem, reason: DropReason) -> None:
        self._record(item, "dropped", reason)

    def wait_for(self, count: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self.done:
            while len(self.events) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.done.wait(left)
            return True

    def kinds(self) -> Counter:
        with self.lock:
            return Counter(kind for kind, _, _ in self.events.values())


def make_item(owner: Recorder, seq: int, image: np.ndarray, deadline_s: float = 60.0) -> WorkItem:
    now = time.monotonic()
    return WorkItem(owner, Frame("cam", seq, time.time(), now, image), now + deadline_s, context=("ctx", seq))


def images(n: int, seed: int = 0, size: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("offload")


@pytest.fixture(scope="module")
def weights(tmp) -> dict[str, str]:
    """State dicts saved by the test, so daemon and worker load identical weights."""
    torch.manual_seed(7)
    paths = {}
    for name in ("mobilenet_v3_small", "resnet18"):
        path = tmp / f"{name}.pt"
        torch.save(build_model(name).module.state_dict(), path)
        paths[name] = str(path)
    return paths


@pytest.fixture(scope="module")
def keys(tmp) -> dict[str, Path]:
    out, allow = tmp / "keys", tmp / "allowed"
    for name in ("worker", "daemon", "intruder"):
        assert keys_main(["--out", str(out), "--name", name]) == 0
    allow.mkdir()
    (allow / "daemon.key").write_bytes((out / "daemon.key").read_bytes())
    return {"out": out, "allow": allow}


@pytest.fixture(scope="module")
def workers(tmp, weights, keys):
    """Three worker processes started together: a, b (plain) and secure (CURVE, Ironhouse)."""
    procs = {
        "a": WorkerProcess(tmp, "a"),
        "b": WorkerProcess(tmp, "b", "--models", "mobilenet_v3_small"),
        "secure": WorkerProcess(tmp, "secure", "--models", "mobilenet_v3_small",
                                "--curve-secret-key", str(keys["out"] / "worker.key_secret"),
                                "--allow-clients-dir", str(keys["allow"])),
    }
    try:
        for w in procs.values():
            w.wait_ready()
        yield procs
    finally:
        for w in procs.values():
            w.stop()


def request(endpoint: str, frames: list[bytes], timeout_s: float = 10.0) -> list[bytes]:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
    try:
        sock.connect(endpoint)
        sock.send_multipart(frames)
        return sock.recv_multipart()
    finally:
        sock.close(0)


def header(**fields: Any) -> bytes:
    return json.dumps({"v": 1, "id": "r1", **fields}).encode()


# ----------------------------------------------------------------------------- protocol (no processes)

def test_protocol_round_trips_requests_frames_and_outputs():
    img = images(1)[0]
    for enc in ("raw", "png"):
        meta, payload = p.encode_frame(img, p.FrameEncoding(enc))
        msg = p.decode(p.encode(p.InferRequest("x", p.ModelKey("resnet18", "/w.pt"), meta, payload, 12.5)),
                       MAX_PAYLOAD, p.REQUEST_KINDS)
        assert isinstance(msg, p.InferRequest) and msg.model.text == "resnet18@/w.pt" and msg.budget_ms == 12.5
        assert np.array_equal(p.decode_frame(msg.frame, msg.payload), img)
    smooth = np.dstack([np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))] * 3)
    meta, payload = p.encode_frame(smooth, p.FrameEncoding("jpeg", 95))
    assert meta == {"encoding": "jpeg", "shape": [64, 64, 3]} and len(payload) < smooth.nbytes
    assert np.abs(p.decode_frame(meta, payload).astype(int) - smooth).mean() < 3

    dets = Detections(np.arange(8, dtype=np.float32).reshape(2, 4), np.array([0.9, 0.5], np.float32),
                      np.array([2, 7], np.int64))
    for out in (dets, Detections.empty(), ClassProbs(np.full(10, 0.1, np.float32))):
        meta, payload = p.encode_output(out)
        back = p.decode(p.encode(p.Result("x", meta, payload)), 1 << 30, p.REPLY_KINDS).decoded_output()
        assert type(back) is type(out)
        for name in out.__dataclass_fields__:
            assert np.array_equal(getattr(back, name), getattr(out, name))
            assert getattr(back, name).dtype == getattr(out, name).dtype

    t = np.random.default_rng(1).standard_normal((1, 4, 3, 3)).astype(np.float32)
    msg = p.decode(p.encode(p.SplitRequest("y", p.ModelKey("resnet18"), 3, p.ArraySpec.of(t), p.array_to_bytes(t))),
                   MAX_PAYLOAD, p.REQUEST_KINDS)
    assert msg.split_at == 3 and np.array_equal(p.array_from_bytes(msg.payload, msg.tensor, "t"), t)
    assert p.ModelKey.parse("yolov8n@init") == p.ModelKey("yolov8n")


# ----------------------------------------------------------------------------- worker: malformed input

MALFORMED: list[tuple[str, list[bytes], str]] = [
    ("random bytes, one frame", [os.urandom(40)], p.ErrorCode.BAD_REQUEST),
    ("three frames", [header(kind="ping"), b"", b"extra"], p.ErrorCode.BAD_REQUEST),
    ("empty object", [b"{}", b""], p.ErrorCode.UNSUPPORTED_VERSION),
    ("random bytes, two frames", [os.urandom(64), os.urandom(64)], p.ErrorCode.BAD_REQUEST),
    ("bad json", [b'{"v": 1, "kind": "ping"', b""], p.ErrorCode.BAD_REQUEST),
    ("json list", [b"[1, 2]", b""], p.ErrorCode.BAD_REQUEST),
    ("wrong version", [json.dumps({"v": 99, "kind": "ping", "id": "r1"}).encode(), b""],
     p.ErrorCode.UNSUPPORTED_VERSION),
    ("unknown kind", [header(kind="explode"), b""], p.ErrorCode.UNKNOWN_KIND),
    ("reply kind sent as a request", [header(kind="result"), b""], p.ErrorCode.UNKNOWN_KIND),
    ("id not a string", [json.dumps({"v": 1, "kind": "ping", "id": 5}).encode(), b""], p.ErrorCode.BAD_REQUEST),
    ("ping with a payload", [header(kind="ping"), b"xx"], p.ErrorCode.BAD_REQUEST),
    ("infer without model", [header(kind="infer", frame={"encoding": "jpeg", "shape": [8, 8, 3]}), b"x"],
     p.ErrorCode.BAD_REQUEST),
    ("infer without id", [json.dumps({"v": 1, "kind": "infer", "model": "mobilenet_v3_small",
                                      "frame": {"encoding": "raw", "shape": [8, 8, 3]}}).encode(), bytes(192)],
     p.ErrorCode.BAD_REQUEST),
    ("unknown model", [header(kind="infer", model="nosuchnet", frame={"encoding": "raw", "shape": [8, 8, 3]}),
                       bytes(192)], p.ErrorCode.MODEL_UNAVAILABLE),
    ("missing weights file", [header(kind="infer", model="mobilenet_v3_small@/nonexistent/w.pt",
                                     frame={"encoding": "raw", "shape": [8, 8, 3]}), bytes(192)],
     p.ErrorCode.MODEL_UNAVAILABLE),
    ("raw frame of the wrong size", [header(kind="infer", model="mobilenet_v3_small",
                                            frame={"encoding": "raw", "shape": [8, 8, 3]}), bytes(100)],
     p.ErrorCode.BAD_REQUEST),
    ("frame shape not HxWx3", [header(kind="infer", model="mobilenet_v3_small",
                                      frame={"encoding": "raw", "shape": [8, 8]}), bytes(64)],
     p.ErrorCode.BAD_REQUEST),
    ("booleans in a frame shape", [header(kind="infer", model="mobilenet_v3_small",
                                          frame={"encoding": "raw", "shape": [True, True, 3]}), bytes(3)],
     p.ErrorCode.BAD_REQUEST),
    ("jpeg that is not a jpeg", [header(kind="infer", model="mobilenet_v3_small",
                                        frame={"encoding": "jpeg", "shape": [8, 8, 3]}), os.urandom(300)],
     p.ErrorCode.BAD_REQUEST),
    ("split tensor of the wrong size", [header(kind="infer_split", model="resnet18", split_at=4,
                                               tensor={"dtype": "float32", "shape": [1, 64, 16, 16]}), bytes(1000)],
     p.ErrorCode.BAD_REQUEST),
    ("split with a bad dtype", [header(kind="infer_split", model="resnet18", split_at=4,
                                       tensor={"dtype": "object", "shape": [1]}), bytes(8)], p.ErrorCode.BAD_REQUEST),
    ("split tensor that does not fit the block", [header(kind="infer_split", model="resnet18", split_at=4,
                                                         tensor={"dtype": "float32", "shape": [1, 5, 4, 4]}),
                                                  bytes(320)], p.ErrorCode.BAD_REQUEST),
    ("split point out of range", [header(kind="infer_split", model="resnet18", split_at=99,
                                         tensor={"dtype": "float32", "shape": [1, 4]}), bytes(16)],
     p.ErrorCode.BAD_REQUEST),
    ("oversized payload", [header(kind="infer", model="mobilenet_v3_small",
                                  frame={"encoding": "jpeg", "shape": [8, 8, 3]}), bytes(MAX_PAYLOAD + 1)],
     p.ErrorCode.TOO_LARGE),
    ("oversized header", [header(kind="ping", pad="x" * (p.MAX_HEADER_BYTES + 10)), b""], p.ErrorCode.TOO_LARGE),
]


def test_worker_answers_malformed_messages_with_errors_and_keeps_serving(workers):
    endpoint = workers["a"].endpoint
    for what, frames, code in MALFORMED:
        reply = request(endpoint, frames)
        assert len(reply) == 2, what
        head = json.loads(reply[0])
        assert head["kind"] == "error" and head["code"] == code, (what, head)
        assert head["message"], what
    # Beyond the transport limit libzmq drops the connection unread; the worker is unaffected.
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sock.send_multipart([header(kind="ping"), bytes(3 * MAX_PAYLOAD + p.MAX_HEADER_BYTES)])
    assert not sock.poll(500)
    sock.close(0)
    # A seeded mini-fuzzer: headers with every field drawn from valid and invalid values.
    rng = np.random.default_rng(2024)
    choices = {
        "v": [1, 1, 2, "1", None], "kind": ["infer", "infer_split", "ping", "heartbeat", "result", 7, None],
        "model": ["mobilenet_v3_small", "resnet18@init", "", 5, "@", None],
        "frame": [{"encoding": "raw", "shape": [4, 4, 3]}, {"encoding": "png", "shape": [4, 4, 3]},
                  {"encoding": "gif"}, {"encoding": "raw", "shape": [-1, 4, 3]}, [], None],
        "split_at": [0, 4, -1, 1.5, True, None], "budget_ms": [None, 0, 1000, -5, "soon"],
        "tensor": [{"dtype": "float32", "shape": [1, 4]}, {"dtype": "float32", "shape": [1, 64, 2, 2]},
                   {"dtype": "int8", "shape": [1]}, {"shape": [1]}, "t", None],
    }
    payloads = [b"", bytes(16), bytes(48), bytes(1024), os.urandom(48)]
    ctx = zmq.Context.instance()
    fuzz = ctx.socket(zmq.DEALER)
    fuzz.setsockopt(zmq.LINGER, 0)
    fuzz.connect(endpoint)
    try:
        for n in range(150):
            head = {k: v[rng.integers(len(v))] for k, v in choices.items() if rng.random() < 0.8}
            head["id"] = f"fuzz{n}"
            fuzz.send_multipart([json.dumps(head).encode(), payloads[rng.integers(len(payloads))]])
            assert fuzz.poll(10_000), f"no reply to {head}"
            reply = json.loads(fuzz.recv_multipart()[0])
            assert reply["kind"] in ("error", "result", "heartbeat"), reply
    finally:
        fuzz.close(0)
    pong = json.loads(request(endpoint, [header(kind="ping", id="alive"), b""])[0])
    assert pong["kind"] == "result" and pong["id"] == "alive" and pong["info"]["name"] == "a"
    assert pong["info"]["counters"]["errors"] >= len(MALFORMED)
    assert workers["a"].proc.poll() is None


# ----------------------------------------------------------------------------- correctness of results

@pytest.mark.parametrize("encoding", ["raw", "png", "jpeg"])
def test_offloaded_outputs_equal_local_outputs(workers, weights, encoding):
    key = f"mobilenet_v3_small@{weights['mobilenet_v3_small']}"
    local = build_model("mobilenet_v3_small", weights["mobilenet_v3_small"])
    frames = images(4, seed=3)
    client = OffloadClient(Tier("a", workers["a"].endpoint), heartbeat_ms=200,
                           encoding=p.FrameEncoding(encoding, 90)).start()
    try:
        owner = Recorder()
        port = client.port(key, drop_fallback)
        assert port.key == key and port.model is None
        for i, img in enumerate(frames):
            assert port.submit(make_item(owner, i, img))
        assert owner.wait_for(len(frames), 30)
    finally:
        client.stop()
    for i, img in enumerate(frames):
        kind, output, tier = owner.events[i]
        assert kind == "offloaded" and tier == "a"
        # The daemon's reference: the same frame after the same encoding, run locally.
        meta, payload = p.encode_frame(img, p.FrameEncoding(encoding, 90))
        expected = local.predict([p.decode_frame(meta, payload)])[0]
        np.testing.assert_allclose(output.probs, expected.probs, rtol=1e-4, atol=1e-6)
        assert output.top1 == expected.top1
    assert not owner.duplicates


def test_a_batch_frame_without_a_deadline_is_served_by_a_worker(workers, weights):
    """Batch replay's items have no deadline (inf): the request carries no budget, not an infinite one."""
    key = f"mobilenet_v3_small@{weights['mobilenet_v3_small']}"
    client = OffloadClient(Tier("a", workers["a"].endpoint), heartbeat_ms=200).start()
    owner = Recorder()
    try:
        image = images(1, seed=5)[0]
        item = WorkItem(owner, Frame("cam", 0, time.time(), time.monotonic(), image), float("inf"), context=("ctx", 0))
        assert client.port(key, drop_fallback).submit(item)
        assert owner.wait_for(1, 30)
    finally:
        client.stop()
    assert owner.events[0][0] == "offloaded", owner.events


@pytest.mark.parametrize("name,splits", [("resnet18", [0, 4, 8, 9, 10]), ("mobilenet_v3_small", [0, 1, 2, 3])])
def test_split_head_and_tail_equal_the_full_model(weights, name, splits):
    model = build_model(name, weights[name])
    split = SplitModel(model)
    frames = images(1, seed=5)
    full = model.predict(frames)
    for k in splits:
        out = split.tail(split.head(frames, k), k)
        for a, b in zip(out, full):
            np.testing.assert_allclose(a.probs, b.probs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name,split_at", [("resnet18", 5), ("mobilenet_v3_small", 1)])
def test_split_execution_on_a_worker_equals_local_execution(workers, weights, name, split_at):
    key = f"{name}@{weights[name]}"
    local = build_model(name, weights[name])
    frames = images(3, seed=9)
    client = OffloadClient(Tier("a", workers["a"].endpoint), heartbeat_ms=200).start()
    try:
        owner = Recorder()
        port = client.port(key, drop_fallback, split_at=split_at, split_model=SplitModel(local), model=local)
        assert port.model is local
        for i, img in enumerate(frames):
            assert port.submit(make_item(owner, i, img))
        assert owner.wait_for(len(frames), 30)
    finally:
        client.stop()
    for i, expected in enumerate(local.predict(frames)):
        kind, output, _ = owner.events[i]
        assert kind == "offloaded", owner.events[i]
        np.testing.assert_allclose(output.probs, expected.probs, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- reliability without models

class SilentRouter:
    """A fake tier that answers heartbeats but never answers inference: requests time out."""

    def __init__(self) -> None:
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.infer_seen = 0
        self.identities: set[bytes] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(50):
                continue
            frames = self.sock.recv_multipart()
            head = json.loads(frames[1])
            if head["kind"] == "heartbeat":
                self.sock.send_multipart([frames[0], *p.encode(p.Heartbeat())])
            else:
                self.infer_seen += 1
                self.identities.add(frames[0])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close(0)


def test_timeouts_retry_on_a_fresh_socket_then_fall_back():
    router = SilentRouter()
    client = OffloadClient(Tier("silent", router.endpoint, timeout_ms=300, retries=2, credit=2),
                           heartbeat_ms=100).start()
    try:
        assert client.wait_state(TierState.UP, 5)
        owner = Recorder()
        port = client.port("mobilenet_v3_small", drop_fallback)
        assert port.submit(make_item(owner, 0, images(1)[0]))
        assert port.submit(make_item(owner, 1, images(1)[0]))
        assert port.submit(make_item(owner, 2, images(1)[0])), "credit 2: the third takes the fallback"
        assert owner.wait_for(3, 10)
        assert owner.events[2] == ("dropped", DropReason.QUEUE_FULL, None)
        assert owner.events[0] == ("dropped", DropReason.TIER_DOWN, None)
        assert owner.events[1] == ("dropped", DropReason.TIER_DOWN, None)
        snap = client.snapshot()
        # each request timed out 1 + retries times; a reconnect re-sends everything in flight, so a
        # request sent a little later than the one that timed out can be re-sent once more (load)
        assert snap["timeouts"] == 6 and snap["retries"] >= 4 and snap["reconnects"] >= 2
        assert snap["fallbacks"] == {"queue-full": 1, "tier-down": 2} and snap["in_flight"] == 0
        assert router.infer_seen == 2 + snap["retries"] and len(router.identities) >= 3   # re-sent from new sockets
        assert client.state == TierState.UP                             # heartbeats still answered
        assert port.submit(make_item(owner, 3, images(1)[0])), "credit is back"
    finally:
        client.stop()
        router.close()
    assert owner.wait_for(4, 5) and owner.events[3][1] == DropReason.SHUTDOWN
    assert not owner.duplicates


def test_unreachable_tier_goes_down_and_items_take_the_fallback():
    ctx = zmq.Context.instance()
    probe = ctx.socket(zmq.ROUTER)
    port_number = probe.bind_to_random_port("tcp://127.0.0.1")
    probe.close(0)                                    # a port with nobody listening
    client = OffloadClient(Tier("gone", f"tcp://127.0.0.1:{port_number}", timeout_ms=5000), heartbeat_ms=100).start()
    local_owner_calls: list[int] = []

    def fallback(item: WorkItem, reason: DropReason) -> None:
        local_owner_calls.append(item.frame.seq)
        item.owner.dropped(item, reason)

    try:
        owner = Recorder()
        port = client.port("mobilenet_v3_small", fallback)
        assert port.submit(make_item(owner, 0, images(1)[0]))      # in flight when the tier is declared down
        assert client.wait_state(TierState.DOWN, 5)
        assert port.submit(make_item(owner, 1, images(1)[0]))      # down already: straight to the fallback
        assert owner.wait_for(2, 5)
    finally:
        client.stop()
    assert sorted(local_owner_calls) == [0, 1]
    assert all(ev == ("dropped", DropReason.TIER_DOWN, None) for ev in owner.events.values())


class _Echo:
    """A local model: the output is the frame's mean, so a result shows which frame it came from."""

    name = "echo"

    def predict(self, images):
        return [float(img.mean()) for img in images]


def test_a_dying_tier_sends_what_it_has_no_credit_for_to_the_local_fallback():
    """A hung worker (connected, silent) holds its credit until it is marked down: frames that
    cannot get credit meanwhile run locally (fallback: local) instead of being dropped queue-full."""
    ctx = zmq.Context.instance()
    hung = ctx.socket(zmq.ROUTER)
    hung.setsockopt(zmq.LINGER, 0)
    hung_port = hung.bind_to_random_port("tcp://127.0.0.1")       # accepts, never answers
    local = ModelWorker("echo", _Echo(), max_batch=4, capacity=64)
    local.start()
    group = TierGroup([Tier("dying", f"tcp://127.0.0.1:{hung_port}", timeout_ms=5000, credit=2)],
                      heartbeat_ms=100).start()
    owner = Recorder()
    frames = images(12)
    try:
        port = group.port("mobilenet_v3_small", local_fallback(local))
        for seq, image in enumerate(frames):
            assert port.submit(make_item(owner, seq, image))
        assert owner.wait_for(len(frames), 10), owner.events
    finally:
        group.stop()
        local.stop()
        hung.close(0)
    assert owner.kinds() == Counter({"local": 12}) and not owner.duplicates
    assert all(owner.events[seq][1] == pytest.approx(float(img.mean())) for seq, img in enumerate(frames))
    fallbacks = group.snapshot()["fallbacks"]
    assert fallbacks == {"queue-full": 10, "tier-down": 2}, fallbacks


# ----------------------------------------------------------------------------- CURVE

def test_curve_worker_refuses_unknown_keys_and_serves_the_allowed_one(workers, keys, weights):
    secure = workers["secure"]
    server_key = str(keys["out"] / "worker.key")
    key = f"mobilenet_v3_small@{weights['mobilenet_v3_small']}"
    # the refused clients are judged down after 0.3 s of silence; the allowed one gets 3 s, so a
    # worker slowed by a loaded machine (its first inference, the handshakes) is not judged down
    good = OffloadClient(Tier("good", secure.endpoint, server_key,
                              client_secret_key=str(keys["out"] / "daemon.key_secret")), heartbeat_ms=1000).start()
    intruder = OffloadClient(Tier("intruder", secure.endpoint, server_key,
                                  client_secret_key=str(keys["out"] / "intruder.key_secret")), heartbeat_ms=100).start()
    plain = OffloadClient(Tier("plain", secure.endpoint), heartbeat_ms=100).start()
    try:
        owner_good, owner_bad, owner_plain = Recorder(), Recorder(), Recorder()
        frame = images(1)[0]
        assert good.port(key, drop_fallback).submit(make_item(owner_good, 0, frame))
        assert intruder.port(key, drop_fallback).submit(make_item(owner_bad, 0, frame))
        assert plain.port(key, drop_fallback).submit(make_item(owner_plain, 0, frame))
        assert owner_good.wait_for(1, 30) and owner_bad.wait_for(1, 10) and owner_plain.wait_for(1, 10)
        assert owner_good.events[0][0] == "offloaded" and good.state == TierState.UP
        assert owner_bad.events[0] == ("dropped", DropReason.TIER_DOWN, None)
        assert owner_plain.events[0] == ("dropped", DropReason.TIER_DOWN, None)
        assert intruder.state == TierState.DOWN and plain.state == TierState.DOWN
        assert intruder.snapshot()["completed"] == 0
    finally:
        for c in (good, intruder, plain):
            c.stop()
    time.sleep(0.2)
    log = secure.log()
    assert "refused CURVE client" in log
    assert "handshake failed" in log
    # Graceful stop on SIGTERM.
    secure.proc.send_signal(signal.SIGTERM)
    assert secure.proc.wait(10) == 0
    assert "worker stopped" in secure.log()


def test_keys_cli_makes_a_private_secret_and_refuses_to_overwrite(tmp):
    out = tmp / "keys-cli"
    assert keys_main(["--out", str(out), "--name", "edge1"]) == 0
    assert (out / "edge1.key").exists() and (out / "edge1.key_secret").stat().st_mode & 0o777 == 0o600
    assert keys_main(["--out", str(out), "--name", "edge1"]) == 1
    assert keys_main(["--out", str(out), "--name", "../evil"]) == 2


# ----------------------------------------------------------------------------- TierGroup: a worker dies mid-stream

def test_tier_group_moves_traffic_off_a_killed_worker_and_accounts_for_every_item(workers, weights):
    key = f"mobilenet_v3_small@{weights['mobilenet_v3_small']}"
    local_model = build_model("mobilenet_v3_small", weights["mobilenet_v3_small"])
    local = ModelWorker(key, local_model, capacity=64)
    local.start()
    group = TierGroup([Tier("a", workers["a"].endpoint, credit=3), Tier("b", workers["b"].endpoint, credit=3)],
                      heartbeat_ms=150).start()
    owner = Recorder()
    submitted, refused = 0, []
    victim = workers["b"]
    try:
        assert group.wait_up(15)
        port = group.port(key, local_fallback(local))
        frames = images(8, seed=11)
        in_flight_at_kill = None
        for seq in range(60):
            item = make_item(owner, seq, frames[seq % len(frames)])
            submitted += 1
            if not port.submit(item):
                refused.append(seq)       # out of credit on both tiers: the query would drop it queue-full
            if seq == 25:
                kill_seq = seq
                in_flight_at_kill = group.clients[1].in_flight
                victim.proc.send_signal(signal.SIGKILL)
            time.sleep(0.03)
        assert owner.wait_for(submitted - len(refused), 60), group.snapshot()
        snap = group.snapshot()
        # Phase 2: the last worker stops (SIGTERM, graceful): items fall back to the local model.
        survivor = workers["a"]
        survivor.proc.send_signal(signal.SIGTERM)
        assert survivor.proc.wait(10) == 0
        assert group.clients[0].wait_state(TierState.DOWN, 5)
        for seq in range(submitted, submitted + 5):
            assert port.submit(make_item(owner, seq, frames[0]))
        assert owner.wait_for(submitted - len(refused) + 5, 30)
        assert all(owner.events[s][0] == "local" for s in range(submitted, submitted + 5))
        submitted += 5
    finally:
        group.stop()
        local.stop()
    victim.proc.wait(5)
    assert not owner.duplicates
    kinds = owner.kinds()
    assert kinds["offloaded"] + kinds["local"] + kinds["dropped"] + len(refused) == submitted
    assert set(owner.events) | set(refused) == set(range(submitted))
    assert not set(owner.events) & set(refused)
    by_tier_before = Counter(t for s, (k, _, t) in owner.events.items() if k == "offloaded" and s < kill_seq)
    by_tier_after = Counter(t for s, (k, _, t) in owner.events.items() if k == "offloaded" and s > kill_seq + 5)
    assert by_tier_before["a"] > 0 and by_tier_before["b"] > 0, by_tier_before   # load was spread
    assert by_tier_after["b"] == 0 and by_tier_after["a"] > 0, by_tier_after      # and moved off the dead one
    assert snap["tiers"]["b"]["state"] == "down" and snap["tiers"]["b"]["went_down"] == 1
    assert snap["tiers"]["a"]["state"] == "up"
    moved = snap["rerouted"] + sum(snap["fallbacks"].values())
    assert moved >= (in_flight_at_kill or 0), snap
    print(f"\nkill mid-stream: submitted {submitted}, {dict(kinds)}, refused {len(refused)}, "
          f"in flight on b at kill {in_flight_at_kill}, rerouted {snap['rerouted']}, fallbacks {snap['fallbacks']}")


def test_compressed_frames_cannot_claim_more_pixels_than_their_header_or_the_limit():
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    def png_claiming(h: int, w: int) -> bytes:
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))

    with pytest.raises(p.ProtocolError, match="60000x60000, header says 8x8"):
        p.decode_frame({"encoding": "png", "shape": [8, 8, 3]}, png_claiming(60000, 60000))
    with pytest.raises(p.ProtocolError, match="pixel limit") as err:
        p.decode_frame({"encoding": "png", "shape": [60000, 60000, 3]}, png_claiming(60000, 60000))
    assert err.value.code == p.ErrorCode.TOO_LARGE
    ok, jpeg = cv2.imencode(".jpg", np.zeros((30, 40, 3), np.uint8))
    assert p.encoded_image_size(jpeg.tobytes()) == (30, 40)
    assert p.decode_frame({"encoding": "jpeg", "shape": [30, 40, 3]}, jpeg.tobytes()).shape == (30, 40, 3)
