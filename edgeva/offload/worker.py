"""`edgeva worker`: serves model inference to other tiers' daemons on a ZeroMQ ROUTER socket.

One I/O thread owns the socket: it validates every message, answers heartbeats and pings at
once (even while a model runs), and answers anything malformed with an error reply; it never
lets input crash it. One compute thread loads models lazily by key and runs requests in
batches (consecutive requests for the same model share one forward pass). SIGTERM: new
requests get a retryable `shutting-down` error, queued ones finish (bounded), then exit.

Run as `python -m edgeva.offload.worker --bind tcp://127.0.0.1:5600 --models resnet18`.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import zmq
from zmq.utils.monitor import recv_monitor_message

from edgeva.offload import protocol as p
from edgeva.offload.keys import ClientAllowList, load_secret_keypair

log = logging.getLogger("edgeva.offload.worker")

_HANDSHAKE_FAILURES = {
    getattr(zmq, "EVENT_HANDSHAKE_FAILED_NO_DETAIL", 0): "no detail",
    getattr(zmq, "EVENT_HANDSHAKE_FAILED_PROTOCOL", 0): "protocol error (wrong mechanism?)",
    getattr(zmq, "EVENT_HANDSHAKE_FAILED_AUTH", 0): "authentication refused",
}


@dataclass
class WorkerOptions:
    bind: str
    models: Optional[list[str]] = None          # allowed "name" (any weights) or "name@weights"; None: any zoo name
    curve_secret_key: Optional[str] = None      # this worker's .key_secret; turns CURVE on
    allow_clients_dir: Optional[str] = None     # public keys (.key) of the daemons allowed in
    device: str = "auto"
    precision: str = "auto"                     # as gpu.precision: checked against fp32 per model at load
    max_batch: int = 8
    queue_size: int = 64
    max_payload_bytes: int = 32 * 1024 * 1024
    download: bool = False
    name: str = field(default_factory=lambda: f"{os.uname().nodename}:{os.getpid()}")
    drain_s: float = 3.0


@dataclass
class _Job:
    envelope: list[bytes]
    request: Union[p.InferRequest, p.SplitRequest]
    received_mono: float

    def batch_key(self) -> tuple[Any, ...]:
        r = self.request
        if isinstance(r, p.SplitRequest):
            return ("split", r.model.text, r.split_at, r.tensor.dtype, r.tensor.shape[1:])
        return ("infer", r.model.text)


class ModelCache:
    """Models by key, built on first use; a failed load is remembered for `retry_after_s`."""

    MAX_MODELS = 8          # least recently used ones beyond this are unloaded
    MAX_FAILURES = 256

    def __init__(self, allowed: Optional[Sequence[str]], device: str, download: bool, retry_after_s: float = 10.0,
                 precision: str = "auto"):
        self.allowed = list(allowed) if allowed else None
        self.device = device
        self.precision = precision
        self.download = download
        self.retry_after_s = retry_after_s
        self._models: dict[str, Any] = {}   # insertion order = recency (moved to the end on use)
        self._splits: dict[str, Any] = {}
        self._failures: dict[str, tuple[float, str]] = {}

    def permits(self, key: p.ModelKey) -> bool:
        from edgeva.models import zoo_names

        if self.allowed is None:
            return key.name in zoo_names()
        return key.name in self.allowed or key.text in self.allowed

    def loaded(self) -> list[str]:
        return sorted(self._models)

    def get(self, key: p.ModelKey) -> Any:
        model = self._models.pop(key.text, None)
        if model is not None:
            self._models[key.text] = model
            return model
        failed = self._failures.get(key.text)
        if failed is not None and time.monotonic() - failed[0] < self.retry_after_s:
            raise p.ProtocolError(p.ErrorCode.MODEL_UNAVAILABLE, failed[1])
        from edgeva.models import build_model

        started = time.monotonic()
        try:
            model = build_model(key.name, key.weights, self.download, self.device)
        except Exception as exc:   # ModelLoadError, or anything a strange weights file provokes
            message = f"cannot load {key.text}: {exc}"
            if len(self._failures) >= self.MAX_FAILURES:
                self._failures.pop(next(iter(self._failures)))
            self._failures[key.text] = (time.monotonic(), message)
            log.warning("%s", message)
            raise p.ProtocolError(p.ErrorCode.MODEL_UNAVAILABLE, message) from None
        from edgeva.models.precision import choose_precision

        try:      # on CUDA also the warm-up, before the first request is timed
            choose_precision(model, self.precision)
        except Exception:
            log.exception("%s: precision check failed; it runs in float32", key.text)
            model.autocast_dtype = None
        log.info("loaded %s in %.2f s", key.text, time.monotonic() - started)
        self._models[key.text] = model
        while len(self._models) > self.MAX_MODELS:
            evicted = next(iter(self._models))
            self._models.pop(evicted)
            self._splits.pop(evicted, None)
            log.info("unloaded %s (least recently used)", evicted)
        return model

    def split(self, key: p.ModelKey) -> Any:
        from edgeva.offload.split import SplitError, SplitModel

        split = self._splits.get(key.text)
        if split is None:
            try:
                split = SplitModel(self.get(key))
            except SplitError as exc:
                raise p.ProtocolError(p.ErrorCode.BAD_REQUEST, str(exc)) from None
            self._splits[key.text] = split
        return split


class OffloadWorker:
    """The worker server; `serve()` runs the I/O loop in the calling thread until `request_stop()`."""

    def __init__(self, options: WorkerOptions, context: Optional[zmq.Context] = None):
        self.options = options
        self.models = ModelCache(options.models, options.device, options.download, precision=options.precision)
        self.counters: dict[str, int] = {"requests": 0, "results": 0, "errors": 0, "heartbeats": 0,
                                         "unroutable": 0, "refused_handshakes": 0}
        self.errors_by_code: dict[str, int] = {}
        self.bound_endpoint: Optional[str] = None
        self._ctx = context or zmq.Context()
        self._own_ctx = context is None
        self._sock: Optional[zmq.Socket] = None
        self._monitor: Optional[zmq.Socket] = None
        self._auth: Any = None
        self._jobs: deque[_Job] = deque()
        self._jobs_cond = threading.Condition()
        self._outbox: deque[list[bytes]] = deque()
        self._outbox_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        self._stop_requested = threading.Event()
        self._compute_stop = False
        self._running = 0                   # jobs in the batch the compute thread is running
        self._compute = threading.Thread(target=self._compute_loop, name="offload-compute", daemon=True)
        self._started_mono = time.monotonic()

    # ------------------------------------------------------------------ lifecycle
    def bind(self) -> str:
        opts = self.options
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)     # an unroutable reply raises instead of vanishing
        sock.setsockopt(zmq.SNDHWM, 10_000)
        # Up to twice the payload limit still arrives, so an oversized request gets an error reply;
        # beyond that libzmq drops the connection unread.
        sock.setsockopt(zmq.MAXMSGSIZE, 2 * opts.max_payload_bytes + p.MAX_HEADER_BYTES)
        try:
            if opts.curve_secret_key:
                self._start_curve(sock)
            self._monitor = sock.get_monitor_socket(
                zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
            sock.bind(opts.bind)
        except Exception:
            sock.close(0)
            raise
        self._sock = sock
        self.bound_endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._compute.start()
        log.info("worker %s serving on %s (curve %s, models %s)", opts.name, self.bound_endpoint,
                 "on" if opts.curve_secret_key else "off", ",".join(opts.models) if opts.models else "any")
        return self.bound_endpoint

    def _start_curve(self, sock: zmq.Socket) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        opts = self.options
        if not zmq.has("curve"):
            raise RuntimeError("this libzmq has no CURVE support")
        public, secret = load_secret_keypair(opts.curve_secret_key)
        if not opts.allow_clients_dir:
            raise ValueError("--curve-secret-key needs --allow-clients-dir (the daemons' public keys)")
        allow = ClientAllowList(Path(opts.allow_clients_dir), on_refused=self._refused)
        self._auth = ThreadAuthenticator(self._ctx, log=logging.getLogger("edgeva.offload.zap"))
        self._auth.start()
        self._auth.configure_curve_callback(domain="*", credentials_provider=allow)
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True

    def _refused(self, client_key: bytes) -> None:
        with self._outbox_lock:
            self.counters["refused_handshakes"] += 1

    def request_stop(self) -> None:
        """Safe from a signal handler: start the drain; serve() returns when it is done."""
        self._stop_requested.set()
        try:
            os.write(self._wake_w, b"s")
        except OSError:
            pass

    def close(self) -> None:
        with self._jobs_cond:
            self._compute_stop = True
            self._jobs_cond.notify_all()
        if self._compute.is_alive():
            self._compute.join(timeout=5)
        if self._sock is not None:
            self._flush_outbox()   # replies of the batch that was running when the stop came
        for sock in (self._monitor, self._sock):
            if sock is not None:
                sock.close(0)
        if self._auth is not None:
            self._auth.stop()
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self._own_ctx:
            self._ctx.term()

    # ------------------------------------------------------------------ I/O thread
    def serve(self) -> None:
        assert self._sock is not None, "bind() first"
        sock, monitor = self._sock, self._monitor
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        if monitor is not None:
            poller.register(monitor, zmq.POLLIN)
        drain_until: Optional[float] = None
        while True:
            events = dict(poller.poll(200))
            if self._wake_r in events:
                os.read(self._wake_r, 4096)
            if sock in events:
                for _ in range(256):
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._handle(frames)
            if monitor is not None and monitor in events:
                self._log_monitor_events(monitor)
            self._flush_outbox()
            if self._stop_requested.is_set():
                if drain_until is None:
                    drain_until = time.monotonic() + self.options.drain_s
                    log.info("stopping: finishing %d queued requests (at most %.1f s)",
                             self._queued(), self.options.drain_s)
                if (self._queued() == 0 and self._outbox_empty()) or time.monotonic() > drain_until:
                    break
        left = self._take_all_jobs()
        for job in left:
            self._reply(job.envelope, p.ErrorReply(job.request.id, p.ErrorCode.SHUTTING_DOWN,
                                                   "worker stopped before running it", True))
        self._flush_outbox()
        log.info("worker stopped: %s", self.counters)

    def _handle(self, frames: list[bytes]) -> None:
        envelope, body = p.split_envelope(frames)
        if not envelope or not envelope[0]:
            return
        self.counters["requests"] += 1
        try:
            message = p.decode(body, self.options.max_payload_bytes, p.REQUEST_KINDS)
        except p.ProtocolError as exc:
            self._reply(envelope, p.ErrorReply.from_exception(exc))
            return
        except Exception as exc:  # a decoder bug must not take the worker down
            log.exception("decoding a request failed")
            self._reply(envelope, p.ErrorReply("", p.ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"))
            return
        if isinstance(message, p.Heartbeat):
            self.counters["heartbeats"] += 1
            self._reply(envelope, p.Heartbeat(message.id))
        elif isinstance(message, p.Ping):
            self._reply(envelope, p.Result(message.id, info=self.info(), worker=self.options.name))
        elif self._stop_requested.is_set():
            self._reply(envelope, p.ErrorReply(message.id, p.ErrorCode.SHUTTING_DOWN, "worker is stopping", True))
        elif not self.models.permits(message.model):
            self._reply(envelope, p.ErrorReply(message.id, p.ErrorCode.MODEL_UNAVAILABLE,
                                               f"model {message.model.text!r} is not served here"))
        else:
            with self._jobs_cond:
                if len(self._jobs) >= self.options.queue_size:
                    busy = True
                else:
                    busy = False
                    self._jobs.append(_Job(envelope, message, time.monotonic()))
                    self._jobs_cond.notify()
            if busy:
                self._reply(envelope, p.ErrorReply(message.id, p.ErrorCode.BUSY,
                                                   f"queue full ({self.options.queue_size})", True))

    def _reply(self, envelope: list[bytes], message: p.Message) -> None:
        """Queue a reply for the I/O thread; callable from either thread."""
        frames = envelope + p.encode(message)
        with self._outbox_lock:
            if isinstance(message, p.ErrorReply):
                self.counters["errors"] += 1
                self.errors_by_code[message.code] = self.errors_by_code.get(message.code, 0) + 1
            elif isinstance(message, p.Result) and message.output:
                self.counters["results"] += 1
            self._outbox.append(frames)
        if isinstance(message, p.ErrorReply):
            log.debug("error reply %s: %s", message.code, message.message)

    def _flush_outbox(self) -> None:
        assert self._sock is not None
        with self._outbox_lock:
            pending, self._outbox = self._outbox, deque()
        for frames in pending:
            try:
                self._sock.send_multipart(frames, zmq.NOBLOCK)
            except zmq.ZMQError:   # the client is gone (EHOSTUNREACH) or not reading (EAGAIN)
                self.counters["unroutable"] += 1

    def _log_monitor_events(self, monitor: zmq.Socket) -> None:
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            what = _HANDSHAKE_FAILURES.get(event["event"], str(event["event"]))
            log.warning("refused a connection on %s: handshake failed (%s, errno %s)",
                        event.get("endpoint", b"").decode(errors="replace"), what, event.get("value"))

    def info(self) -> dict[str, Any]:
        return {"name": self.options.name, "pid": os.getpid(), "models_loaded": self.models.loaded(),
                "queued": self._queued(), "uptime_s": round(time.monotonic() - self._started_mono, 3),
                "curve": bool(self.options.curve_secret_key), "counters": dict(self.counters),
                "errors_by_code": dict(self.errors_by_code)}

    def _queued(self) -> int:
        """Requests not answered yet: waiting, or in the batch the compute thread is running."""
        with self._jobs_cond:
            return len(self._jobs) + self._running

    def _outbox_empty(self) -> bool:
        with self._outbox_lock:
            return not self._outbox

    def _take_all_jobs(self) -> list[_Job]:
        with self._jobs_cond:
            left, self._jobs = list(self._jobs), deque()
        return left

    # ------------------------------------------------------------------ compute thread
    def _compute_loop(self) -> None:
        while True:
            with self._jobs_cond:
                while not self._jobs and not self._compute_stop:
                    self._jobs_cond.wait(timeout=0.5)
                if self._compute_stop:
                    return
                first = self._jobs.popleft()
                batch = [first]
                key = first.batch_key()
                while self._jobs and len(batch) < self.options.max_batch and self._jobs[0].batch_key() == key:
                    batch.append(self._jobs.popleft())
                self._running = len(batch)
            try:
                self._run_batch(batch)
            except Exception as exc:  # the compute thread must outlive any one request
                log.exception("batch of %d failed", len(batch))
                for job in batch:
                    self._reply(job.envelope, p.ErrorReply(job.request.id, p.ErrorCode.INTERNAL,
                                                           f"{type(exc).__name__}: {exc}"))
            finally:
                with self._jobs_cond:
                    self._running = 0
            try:
                os.write(self._wake_w, b"r")
            except OSError:
                pass

    def _run_batch(self, batch: list[_Job]) -> None:
        now = time.monotonic()
        runnable: list[tuple[_Job, Any]] = []
        for job in batch:
            budget = job.request.budget_ms
            if budget is not None and (now - job.received_mono) * 1000.0 > budget:
                self._reply(job.envelope, p.ErrorReply(job.request.id, p.ErrorCode.DEADLINE,
                                                       f"waited past its budget of {budget:g} ms"))
                continue
            try:
                runnable.append((job, self._decode_input(job.request)))
            except p.ProtocolError as exc:
                exc.request_id = job.request.id
                self._reply(job.envelope, p.ErrorReply.from_exception(exc))
            except Exception as exc:  # hostile input must never reach the compute loop
                self._reply(job.envelope, p.ErrorReply(job.request.id, p.ErrorCode.BAD_REQUEST,
                                                       f"undecodable input: {type(exc).__name__}: {exc}"))
        if not runnable:
            return
        started = time.monotonic()
        try:
            outputs = self._predict([job for job, _ in runnable], [x for _, x in runnable])
        except p.ProtocolError as exc:
            for job, _ in runnable:
                self._reply(job.envelope, p.ErrorReply(job.request.id, exc.code, exc.message,
                                                       exc.code in p.ErrorCode.RETRYABLE))
            return
        except Exception as exc:
            log.exception("inference failed on a batch of %d", len(runnable))
            for job, _ in runnable:
                self._reply(job.envelope, p.ErrorReply(job.request.id, p.ErrorCode.INTERNAL,
                                                       f"inference failed: {type(exc).__name__}: {exc}"))
            return
        finished = time.monotonic()
        if len(outputs) != len(runnable):
            log.error("model returned %d outputs for %d inputs", len(outputs), len(runnable))
        for i, (job, _) in enumerate(runnable):
            try:
                if i >= len(outputs):
                    raise ValueError("the model returned no output for this input")
                meta, payload = p.encode_output(outputs[i])
            except Exception as exc:
                self._reply(job.envelope, p.ErrorReply(job.request.id, p.ErrorCode.INTERNAL,
                                                       f"output failed: {type(exc).__name__}: {exc}"))
                continue
            self._reply(job.envelope, p.Result(job.request.id, meta, payload, worker=self.options.name,
                                               queue_ms=(started - job.received_mono) * 1000.0,
                                               infer_ms=(finished - started) * 1000.0))

    @staticmethod
    def _decode_input(request: Union[p.InferRequest, p.SplitRequest]) -> Any:
        if isinstance(request, p.InferRequest):
            return p.decode_frame(request.frame, request.payload)
        if not request.tensor.shape or request.tensor.shape[0] != 1:
            raise p.ProtocolError(p.ErrorCode.BAD_REQUEST, "a split tensor carries one frame: shape[0] must be 1")
        return p.array_from_bytes(request.payload, request.tensor, "tensor")

    def _predict(self, jobs: list[_Job], inputs: list[Any]) -> list[Any]:
        first = jobs[0].request
        if isinstance(first, p.InferRequest):
            return self.models.get(first.model).predict(inputs)
        import numpy as np
        import torch

        from edgeva.offload.split import SplitError

        split = self.models.split(first.model)
        try:
            split.check_split(first.split_at)
            return split.tail(torch.from_numpy(np.concatenate(inputs, axis=0)).float(), first.split_at)
        except (SplitError, RuntimeError) as exc:   # wrong split point or a tensor of the wrong shape
            raise p.ProtocolError(p.ErrorCode.BAD_REQUEST, f"split execution failed: {exc}") from None


# ---------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edgeva worker", description="Serve model inference to other tiers over ZeroMQ.")
    ap.add_argument("--bind", required=True, help="ZeroMQ endpoint to bind, e.g. tcp://0.0.0.0:5600")
    ap.add_argument("--models", default=None,
                    help="comma-separated models served: 'name' (any weights path) or 'name@weights'; default: the whole zoo")
    ap.add_argument("--curve-secret-key", default=None, help="this worker's secret key file (edgeva keys); requires CURVE")
    ap.add_argument("--allow-clients-dir", default=None, help="folder of public key files (.key) of allowed daemons")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto: CUDA when present)")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                    help="autocast precision, kept per model only if it agrees with fp32 (default auto: fp16 on CUDA)")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--queue", type=int, default=64, help="requests waiting for the model before 'busy' replies")
    ap.add_argument("--max-payload-bytes", type=int, default=32 * 1024 * 1024)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--download", action="store_true", help="allow named library weights downloads")
    ap.add_argument("--name", default=None, help="worker name in replies (default host:pid)")
    ap.add_argument("--log-level", default="info")
    return ap


def worker_main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    options = WorkerOptions(bind=args.bind,
                            models=[m.strip() for m in args.models.split(",") if m.strip()] if args.models else None,
                            curve_secret_key=args.curve_secret_key, allow_clients_dir=args.allow_clients_dir,
                            device=args.device, precision=args.precision, max_batch=max(1, args.max_batch),
                            queue_size=max(1, args.queue),
                            max_payload_bytes=args.max_payload_bytes, download=args.download)
    if args.name:
        options.name = args.name
    worker = OffloadWorker(options)
    try:
        worker.bind()
    except (zmq.ZMQError, OSError, ValueError, RuntimeError) as exc:   # KeyFileError is a ValueError
        print(f"edgeva worker: {exc}", file=sys.stderr)
        worker.close()
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.request_stop())
    print(f"READY {worker.bound_endpoint}", flush=True)
    try:
        worker.serve()
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(worker_main())
