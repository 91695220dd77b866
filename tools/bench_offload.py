#!/usr/bin/env python3
"""Offload vs local execution of the same model on loopback: latency, throughput, and the
overhead beyond frame encode/decode.

Starts one `edgeva.offload.worker` process on 127.0.0.1, then measures, for the same frames:
  local      ZooModel.predict, one frame at a time (latency) and in batches of --batch (throughput)
  codec      frame encode (daemon) and decode (worker) alone
  transport  a heartbeat round trip (no model, no payload)
  offload    one request at a time (round-trip latency) and --credit requests in flight (throughput)
overhead = offload p50 - encode p50 - the worker's own time p50 (reported in each result: decode,
queue, model): what sockets, framing, (de)serialising outputs and thread hand-offs add.
Both sides share this machine's CPU: on a real edge/cloud split the worker has its own.

  .venv/bin/python tools/bench_offload.py --model mobilenet_v3_small --size 640x480 --frames 60
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgeva.work import WorkItem  # noqa: E402
from edgeva.messages import DropReason, Frame  # noqa: E402
from edgeva.offload import OffloadClient, TierState, drop_fallback  # noqa: E402
from edgeva.offload import protocol as p  # noqa: E402


class Waiter:
    """A WorkOwner that lets the benchmark wait for each item's one callback."""

    query_id = "bench"

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.done = 0
        self.failed: list[Any] = []

    def complete_offloaded(self, item: WorkItem, output: Any, finished_mono: float, tier: str) -> None:
        with self.cond:
            self.done += 1
            self.cond.notify_all()

    def complete(self, item: WorkItem, output: Any, finished_mono: float) -> None:
        self.complete_offloaded(item, output, finished_mono, "local")

    def dropped(self, item: WorkItem, reason: DropReason) -> None:
        with self.cond:
            self.done += 1
            self.failed.append(reason)
            self.cond.notify_all()

    def wait(self, count: int, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while self.done < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.done}/{count} answered")
                self.cond.wait(left)


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def timed(fn, n: int) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        out.append((time.perf_counter() - t) * 1000.0)
    return out


def make_frames(n: int, w: int, h: int) -> list[np.ndarray]:
    """Smooth moving scenes (JPEG sizes like real video, unlike noise)."""
    yy, xx = np.mgrid[0:h, 0:w]
    frames = []
    for i in range(n):
        img = np.dstack([(xx * 255 // w + i) % 256, (yy * 255 // h) % 256, ((xx + yy + 3 * i) // 4) % 256])
        img = img.astype(np.uint8)
        x = (i * 7) % max(1, w - 60)
        img[h // 3:h // 3 + 50, x:x + 60] = (30, 200, 240)
        frames.append(img)
    return frames


def start_worker(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "edgeva.offload.worker", "--bind", "tcp://127.0.0.1:0", "--name", "bench",
           "--max-batch", str(args.batch), "--log-level", "warning"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("READY "):
        proc.kill()
        raise SystemExit(f"worker did not start: {line!r}")
    return proc, line.split()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mobilenet_v3_small")
    ap.add_argument("--size", default="640x480", help="frame WxH")
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--encoding", default="jpeg", choices=p.FRAME_ENCODINGS)
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--credit", type=int, default=8, help="requests in flight for the throughput run")
    ap.add_argument("--batch", type=int, default=8, help="local batch size / worker max batch")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (both sides)")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.lower().split("x"))

    import torch

    from edgeva.models import build_model

    if args.threads:
        torch.set_num_threads(args.threads)
    frames = make_frames(args.frames, w, h)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / f"{args.model}.pt"
        model = build_model(args.model)
        if model.module is not None:
            torch.save(model.module.state_dict(), weights)
            key, model = f"{args.model}@{weights}", build_model(args.model, str(weights))
        else:
            key = f"{args.model}@init"
        proc, endpoint = start_worker(args)
        try:
            return run(args, model, key, endpoint, frames)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def run(args: argparse.Namespace, model: Any, key: str, endpoint: str, frames: list[np.ndarray]) -> int:
    n = len(frames)
    model.predict(frames[:2])  # warm-up
    local_ms = timed(lambda i: model.predict([frames[i]]), n)
    t = time.perf_counter()
    for i in range(0, n, args.batch):
        model.predict(frames[i:i + args.batch])
    local_fps = n / (time.perf_counter() - t)

    encoding = p.FrameEncoding(args.encoding, args.quality)
    encoded = [p.encode_frame(f, encoding) for f in frames]
    encode_ms = timed(lambda i: p.encode_frame(frames[i], encoding), n)
    decode_ms = timed(lambda i: p.decode_frame(*encoded[i]), n)
    payload_kb = statistics.mean(len(e[1]) for e in encoded) / 1024

    tier = SimpleNamespace(name="bench", endpoint=endpoint, server_public_key=None, timeout_ms=30000, retries=0,
                           credit=args.credit)
    client = OffloadClient(tier, heartbeat_ms=1000, encoding=encoding).start()
    try:
        if not client.wait_state(TierState.UP, 30):
            raise SystemExit("worker never answered a heartbeat")
        heartbeat_ms = ping_rtts(endpoint, 200)
        port = client.port(key, drop_fallback)
        owner = Waiter()

        def one(i: int) -> None:
            now = time.monotonic()
            port.submit(WorkItem(owner, Frame("bench", i, time.time(), now, frames[i]), now + 60))
            owner.wait(i + 1)

        one(0)  # the worker loads the model on first use
        owner.done = 0
        client.stats.recent_ms.clear()
        offload_ms = timed(one, n)
        worker_ms = [queue + infer for _, queue, infer in client.stats.recent_ms]

        owner.done = 0
        t = time.perf_counter()
        submitted = 0
        while submitted < n:
            now = time.monotonic()
            item = WorkItem(owner, Frame("bench", submitted, time.time(), now, frames[submitted]), now + 60)
            # Wait for tier credit (as batch replay does): without a wait, a full tier sends the
            # frame to the fallback, which is not what this measures.
            port.submit(item, wait_s=60.0)
            submitted += 1
        owner.wait(n)
        offload_fps = n / (time.perf_counter() - t)
        failed = list(owner.failed)
    finally:
        client.stop()

    # The worker's own time from receipt to result (frame decode, queue, model); it shares this
    # CPU, so its model time differs from the local run's.
    overhead = pct(offload_ms, .5) - pct(worker_ms, .5) - pct(encode_ms, .5)
    rows = [
        ("local predict (1 frame)", pct(local_ms, .5), pct(local_ms, .95), 1.0),
        ("frame encode", pct(encode_ms, .5), pct(encode_ms, .95), pct(encode_ms, .5) / pct(local_ms, .5)),
        ("frame decode", pct(decode_ms, .5), pct(decode_ms, .95), pct(decode_ms, .5) / pct(local_ms, .5)),
        ("heartbeat round trip", pct(heartbeat_ms, .5), pct(heartbeat_ms, .95),
         pct(heartbeat_ms, .5) / pct(local_ms, .5)),
        ("offload round trip", pct(offload_ms, .5), pct(offload_ms, .95), pct(offload_ms, .5) / pct(local_ms, .5)),
        ("  of which worker decode+queue+model", pct(worker_ms, .5), pct(worker_ms, .95),
         pct(worker_ms, .5) / pct(local_ms, .5)),
        ("  overhead beyond codec+worker", overhead, float("nan"), overhead / pct(local_ms, .5)),
    ]
    print(f"\nmodel {key.split('@')[0]}, frames {n} x {args.size}, {args.encoding} q{args.quality} "
          f"({payload_kb:.1f} KiB/frame), loopback, worker on the same CPU")
    print(f"{'latency':36s} {'p50 ms':>9s} {'p95 ms':>9s} {'x local':>8s}")
    for name, p50, p95, ratio in rows:
        print(f"{name:36s} {p50:9.2f} {p95:9.2f} {ratio:8.2f}")
    print(f"\n{'throughput':36s} {'fps':>9s} {'x local':>8s}")
    print(f"{'local, batch ' + str(args.batch):36s} {local_fps:9.1f} {1.0:8.2f}")
    print(f"{'offload, credit ' + str(args.credit):36s} {offload_fps:9.1f} {offload_fps / local_fps:8.2f}")
    if failed:
        print(f"\nWARNING: {len(failed)} requests failed: {failed[:5]}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": key, "frames": n, "size": args.size, "encoding": args.encoding, "payload_kib": payload_kb,
            "latency_ms": {name: {"p50": p50, "p95": p95} for name, p50, p95, _ in rows},
            "fps": {"local": local_fps, "offload": offload_fps}}, indent=2))
    return 1 if failed else 0


def ping_rtts(endpoint: str, n: int) -> list[float]:
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(endpoint)
    try:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            sock.send_multipart(p.encode(p.Heartbeat("hb")))
            sock.recv_multipart()
            out.append((time.perf_counter() - t) * 1000.0)
        return out
    finally:
        sock.close(0)


if __name__ == "__main__":
    raise SystemExit(main())
