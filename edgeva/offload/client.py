"""The daemon's side of offloading: one `OffloadClient` per tier, `TierGroup` over several.

Surface for the daemon: `port(model_key, fallback)` returns an `OffloadPort` with the same
`.key`, `.model` and `submit(item) -> bool` as a local ModelWorker, so a query can be routed
to a tier without knowing it. `submit` always takes the item: when the tier(s) are out of
credit it goes to the fallback (reason queue-full: with `fallback: local` it runs here, with
`drop` it is dropped queue-full). Every item gets exactly ONE callback on its owner, always
from a client thread, never inside `submit`:
  - `owner.complete_offloaded(item, output, finished_mono, tier)` if the owner has it, else
    `owner.complete(item, output, finished_mono)`; `item.context` is untouched;
  - or the fallback (`local_fallback(worker)` runs it locally, `drop_fallback` drops it with
    the reason: tier-down, error) ; or `owner.dropped(item, DEADLINE | SHUTDOWN)`.

Reliability (Lazy/Paranoid Pirate): a timer per request (tier.timeout_ms); on a timeout the
socket is closed and reopened and what is in flight is sent again, up to tier.retries times per
request; heartbeats every `heartbeat_ms` and a tier that has said nothing for `liveness`
intervals is DOWN: its requests fail over at once (TierGroup: to another live tier, else the
fallback) and it reconnects with a doubling back-off until a heartbeat answers again.
Credit: at most tier.credit requests in flight per tier.
"""
from __future__ import annotations

import enum
import itertools
import logging
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

import zmq

from edgeva.work import WorkItem
from edgeva.messages import DropReason
from edgeva.offload import protocol as p
from edgeva.offload.keys import load_public_key, load_secret_keypair

log = logging.getLogger("edgeva.offload.client")

Fallback = Callable[[WorkItem, DropReason], None]
"""Takes over an item the tier could not serve; must give it exactly one owner callback."""


class LocalPort(Protocol):
    key: str

    def submit(self, item: WorkItem, wait_s: float = 0.0) -> bool: ...


# A batch item (no deadline: replay fast) waits this long for room in the local queue.
BATCH_FALLBACK_WAIT_S = 3600.0


def drop_fallback(item: WorkItem, reason: DropReason) -> None:
    """placement.fallback: drop — the item is dropped with the reason (tier-down, error...)."""
    item.owner.dropped(item, reason)


def local_fallback(local: LocalPort) -> Fallback:
    """placement.fallback: local — run it on the local worker; a full local queue drops it
    (a batch item, without a deadline, waits for room instead)."""

    def run_locally(item: WorkItem, reason: DropReason) -> None:
        if not local.submit(item, wait_s=0.0 if math.isfinite(item.deadline_mono) else BATCH_FALLBACK_WAIT_S):
            item.owner.dropped(item, DropReason.QUEUE_FULL)

    return run_locally


class TierState(str, enum.Enum):
    CONNECTING = "connecting"   # no heartbeat answered yet; requests are sent optimistically
    UP = "up"
    DOWN = "down"               # silent for `liveness` heartbeats; items go elsewhere


# ----------------------------------------------------------------------------- helper thread

class CallbackThread:
    """Runs owner callbacks and frame encoding off the I/O thread and off the callers' threads."""

    def __init__(self, name: str):
        self._tasks: deque[Callable[[], None]] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._done = False          # set under the lock by the thread as it exits: no task is left behind
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def defer(self, task: Callable[[], None]) -> None:
        with self._cond:
            if not self._done:
                self._tasks.append(task)
                self._cond.notify()
                return
        # Stopped already: still never run an owner callback inside the caller's submit().
        threading.Thread(target=task, name="offload-late-cb", daemon=True).start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Run what is queued (bounded by timeout_s), then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._tasks and not self._stopping:
                    self._cond.wait(timeout=0.5)
                if not self._tasks:
                    self._done = True
                    return
                task = self._tasks.popleft()
            try:
                task()
            except Exception:
                log.exception("offload callback failed")


# ----------------------------------------------------------------------------- requests

@dataclass(eq=False)
class _Request:
    item: WorkItem
    port: "OffloadPort"
    message: Optional[p.Message] = None          # built (encoded) once, re-sent with a fresh id
    tiers_tried: list[str] = field(default_factory=list)
    attempts_on_tier: int = 0
    sent_mono: float = 0.0
    _once: threading.Lock = field(default_factory=threading.Lock)

    def claim(self) -> bool:
        """True exactly once: whoever gets it gives the owner its one callback."""
        return self._once.acquire(blocking=False)


class _Router(Protocol):
    """What an OffloadPort hands requests to: a single client or a TierGroup."""

    callbacks: CallbackThread

    def accept_new(self, request: _Request) -> bool: ...

    def failed(self, request: _Request, client: Optional["OffloadClient"], reason: DropReason,
               reroutable: bool) -> None: ...


class OffloadPort:
    """A model on a tier (or tier group), with ModelWorker's surface: key, model, submit."""

    runs_each_frame_once = False       # each query's request travels and runs on its own

    def __init__(self, router: _Router, model_key: str, fallback: Fallback, *, model: Any = None,
                 encoding: Optional[p.FrameEncoding] = None, split_at: Optional[int] = None,
                 split_model: Any = None):
        self.key = model_key
        self.model = model                 # the local ZooModel when the daemon has one (task building)
        self.model_key = p.ModelKey.parse(model_key)
        self.fallback = fallback
        self.encoding = encoding
        self.split_at = split_at
        self.split_model = split_model     # SplitModel running the head locally
        if split_at is not None and split_model is None:
            raise ValueError("a split port needs split_model (the local head)")
        if split_model is not None:
            split_model.check_split(split_at)
        self._router = router

    def submit(self, item: WorkItem, wait_s: float = 0.0) -> bool:
        """Hand the item to the tier(s). Out of credit for `wait_s` (a saturated tier, or a dead
        one not yet marked down), it takes the fallback like a failed request (reason queue-full):
        with `fallback: local` it runs here instead of being dropped."""
        give_up = time.monotonic() + wait_s
        while not self._router.accept_new(_Request(item, self)):
            if time.monotonic() >= give_up:
                self._router.failed(_Request(item, self), None, DropReason.QUEUE_FULL, reroutable=False)
                return True
            time.sleep(0.005)
        return True

    def build_message(self, item: WorkItem, encoding: p.FrameEncoding) -> p.Message:
        """The request for one item (id filled in per send); runs the head for split ports."""
        if self.split_at is not None:
            activations = self.split_model.head([item.frame.image], self.split_at).numpy()
            return p.SplitRequest("", self.model_key, self.split_at, p.ArraySpec.of(activations),
                                  p.array_to_bytes(activations))
        frame_meta, payload = p.encode_frame(item.frame.image, self.encoding or encoding)
        return p.InferRequest("", self.model_key, frame_meta, payload)


def _deliver_result(request: _Request, output: Any, finished_mono: float, tier: str) -> None:
    item = request.item
    owner = item.owner
    try:
        offloaded = getattr(owner, "complete_offloaded", None)
        if offloaded is not None:
            offloaded(item, output, finished_mono, tier)
        else:
            owner.complete(item, output, finished_mono)
    except Exception:  # the owner buckets its own failures; a second callback would double-count
        log.exception("query %s failed on an offloaded result", getattr(owner, "query_id", "?"))


def _drop_once(request: _Request, reason: DropReason) -> None:
    if request.claim():
        request.item.owner.dropped(request.item, reason)


def _run_fallback(request: _Request, reason: DropReason) -> None:
    try:
        request.port.fallback(request.item, reason)
    except Exception:  # the fallback already handed the item on: a second callback would double-count
        log.exception("offload fallback failed")


# ----------------------------------------------------------------------------- one tier

@dataclass
class ClientStats:
    sent: int = 0
    payload_bytes: int = 0      # frames or split activations sent (re-sends included): the uplink's load
    completed: int = 0
    retries: int = 0            # re-sends on this tier after a timeout
    timeouts: int = 0
    reconnects: int = 0
    went_down: int = 0
    failed_over: int = 0        # handed back to the router (tier down, retries spent, busy...)
    error_replies: int = 0
    stale_replies: int = 0      # answers to ids no longer waited for (after a retry or failover)
    send_failures: int = 0
    fallbacks: dict[str, int] = field(default_factory=dict)   # standalone client only (a group counts its own)
    rtt_ms_ewma: Optional[float] = None
    # (round trip, worker queue, worker inference) in ms of recent results: RTT minus the
    # worker's own time is what the network and framing cost (a placement profiler's input).
    recent_ms: deque[tuple[float, float, float]] = field(default_factory=lambda: deque(maxlen=256))


class OffloadClient:
    """A DEALER to one tier's worker, served by its own I/O thread."""

    def __init__(self, tier: Any, *, client_secret_key: Optional[str] = None, heartbeat_ms: Optional[int] = None,
                 liveness: int = 3, encoding: Optional[p.FrameEncoding] = None,
                 context: Optional[zmq.Context] = None, callbacks: Optional[CallbackThread] = None,
                 max_backoff_s: float = 8.0, router: Optional[_Router] = None):
        self.tier = tier
        self.name: str = tier.name
        self.timeout_s = tier.timeout_ms / 1000.0
        self.retries = max(0, int(tier.retries))
        self.credit = max(1, int(tier.credit))
        self.heartbeat_s = (heartbeat_ms or getattr(tier, "heartbeat_ms", None) or 500) / 1000.0
        self.liveness = max(1, liveness)
        self.max_backoff_s = max_backoff_s
        self.encoding = encoding or p.FrameEncoding(getattr(tier, "encoding", None) or "jpeg",
                                                     getattr(tier, "jpeg_quality", None) or 90)
        self.stats = ClientStats()
        self._client_secret_key = client_secret_key or getattr(tier, "client_secret_key", None)
        self._curve = self._curve_keys(tier.server_public_key, self._client_secret_key)
        self._ctx = context or zmq.Context.instance()
        self._own_callbacks = callbacks is None
        self.callbacks = callbacks or CallbackThread(f"offload-{self.name}-cb")
        self._router: _Router = router if router is not None else self   # a TierGroup reroutes failures
        self._lock = threading.Lock()
        self._state = TierState.CONNECTING
        self._credit_used = 0
        self._outbox: deque[_Request] = deque()        # encoded, waiting for the I/O thread
        self._in_flight: dict[str, _Request] = {}       # I/O thread only
        self._ids = itertools.count(1)
        self._id_prefix = f"{self.name}.{os.getpid()}.{id(self) & 0xFFFF:x}"
        self._wake_r, self._wake_w = os.pipe()
        self._stopped = False
        self._stopping = False
        self._thread = threading.Thread(target=self._io_loop, name=f"offload-{self.name}", daemon=True)
        self._state_changed = threading.Condition(self._lock)

    # ------------------------------------------------------------------ public
    def start(self) -> "OffloadClient":
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ends the I/O thread; what is still in flight is dropped with reason shutdown."""
        with self._lock:
            if self._stopped:
                return   # the pipe's fds may already belong to someone else: never close them twice
            self._stopping = True
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)
        if self._own_callbacks:
            self.callbacks.stop(timeout_s)
        if self._thread.is_alive():
            log.warning("tier %s: I/O thread did not stop within %.1f s", self.name, timeout_s)
            return   # it still polls the wake pipe: leave it open rather than pull it from under it
        with self._lock:
            self._stopped = True
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def port(self, model_key: str, fallback: Fallback, **kwargs: Any) -> OffloadPort:
        return OffloadPort(self, model_key, fallback, **kwargs)

    @property
    def state(self) -> TierState:
        with self._lock:
            return self._state

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._credit_used

    def wait_state(self, state: TierState, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._state_changed:
            while self._state != state:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._state_changed.wait(left)
            return True

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            state, used = self._state.value, self._credit_used
        s = self.stats
        return {"endpoint": self.tier.endpoint, "state": state, "in_flight": used, "credit": self.credit,
                "sent": s.sent, "payload_bytes": s.payload_bytes, "completed": s.completed, "retries": s.retries, "timeouts": s.timeouts,
                "reconnects": s.reconnects, "went_down": s.went_down, "failed_over": s.failed_over,
                "error_replies": s.error_replies, "stale_replies": s.stale_replies,
                "fallbacks": dict(s.fallbacks),
                "rtt_ms": None if s.rtt_ms_ewma is None else round(s.rtt_ms_ewma, 3)}

    # ------------------------------------------------------------------ router role (standalone client)
    def accept_new(self, request: _Request) -> bool:
        if self.state == TierState.DOWN:
            self.callbacks.defer(lambda: self._give_up(request, DropReason.TIER_DOWN))
            return True
        return self.try_accept(request)

    def failed(self, request: _Request, client: Optional["OffloadClient"], reason: DropReason,
               reroutable: bool) -> None:
        self.callbacks.defer(lambda: self._give_up(request, reason))

    def _give_up(self, request: _Request, reason: DropReason) -> None:
        if not request.claim():
            return
        if reason in (DropReason.DEADLINE, DropReason.SHUTDOWN):
            request.item.owner.dropped(request.item, reason)
        else:
            self.stats.fallbacks[reason.value] = self.stats.fallbacks.get(reason.value, 0) + 1
            _run_fallback(request, reason)

    # ------------------------------------------------------------------ taking requests
    def try_accept(self, request: _Request) -> bool:
        """Take a request if credit allows; it is encoded on the callback thread, then sent."""
        with self._lock:
            if self._stopping or self._credit_used >= self.credit:
                return False
            self._credit_used += 1
        request.tiers_tried.append(self.name)
        request.attempts_on_tier = 0
        if request.message is not None:
            self._hand_to_io(request)
        else:
            self.callbacks.defer(lambda: self._encode_and_send(request))
        return True

    def _encode_and_send(self, request: _Request) -> None:
        try:
            request.message = request.port.build_message(request.item, self.encoding)
        except Exception:
            log.exception("tier %s: could not encode a frame for %s", self.name, request.port.key)
            self._release(request, DropReason.ERROR, reroutable=False)
            return
        self._hand_to_io(request)

    def _hand_to_io(self, request: _Request) -> None:
        with self._lock:
            accepted = not self._stopping
            if accepted:
                self._outbox.append(request)
        if accepted:
            self._wake()
        else:
            self._release(request, DropReason.SHUTDOWN, reroutable=False)

    def _release(self, request: _Request, reason: DropReason, reroutable: bool) -> None:
        """Give the credit back and hand the request to the router (another tier or the fallback)."""
        with self._lock:
            self._credit_used -= 1
        if reason == DropReason.SHUTDOWN:
            self.callbacks.defer(lambda: _drop_once(request, reason))
            return
        self.stats.failed_over += 1
        self._router.failed(request, self, reason, reroutable)

    def _wake(self) -> None:
        if self._stopped:   # the pipe is closed and its fd numbers may be reused
            return
        try:
            os.write(self._wake_w, b"w")
        except OSError:
            pass

    # ------------------------------------------------------------------ I/O thread
    def _io_loop(self) -> None:
        sock = self._connect()
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        poller.register(sock, zmq.POLLIN)
        now = time.monotonic()
        last_heard = now
        next_heartbeat = now
        backoff = self.heartbeat_s
        reconnect_at: Optional[float] = None
        try:
            while True:
                with self._lock:
                    if self._stopping:
                        break
                events = dict(poller.poll(self._poll_timeout_ms(next_heartbeat, reconnect_at)))
                now = time.monotonic()
                if self._wake_r in events:
                    os.read(self._wake_r, 4096)
                if sock in events:
                    heard = self._receive(sock)
                    if heard:
                        last_heard = now
                        backoff = self.heartbeat_s
                        if self.state != TierState.UP:
                            self._set_state(TierState.UP)
                            log.info("tier %s (%s) is up", self.name, self.tier.endpoint)
                self._send_new(sock)
                # Paranoid Pirate: silence for `liveness` heartbeats means the tier is down.
                if now - last_heard > self.heartbeat_s * self.liveness and reconnect_at is None:
                    if self.state != TierState.DOWN:
                        self.stats.went_down += 1
                        log.warning("tier %s (%s) is down: no answer for %.1f s; %d requests fail over",
                                    self.name, self.tier.endpoint, now - last_heard, len(self._in_flight))
                        self._set_state(TierState.DOWN)
                    self._fail_all(DropReason.TIER_DOWN)
                    reconnect_at = now + backoff
                    backoff = min(backoff * 2, self.max_backoff_s)
                if reconnect_at is not None and now >= reconnect_at:
                    poller.unregister(sock)
                    sock = self._reconnect(sock)
                    poller.register(sock, zmq.POLLIN)
                    reconnect_at = None
                    last_heard = now          # a fresh liveness window for the new connection
                    next_heartbeat = now
                if now >= next_heartbeat:
                    self._send(sock, p.encode(p.Heartbeat()))
                    next_heartbeat = now + self.heartbeat_s
                if self._expire(now):
                    # Lazy Pirate: a lost reply can leave the connection wedged; start afresh.
                    poller.unregister(sock)
                    sock = self._reconnect(sock)
                    poller.register(sock, zmq.POLLIN)
                    for request in list(self._in_flight.values()):
                        self._resend(sock, request)
        except Exception:  # a bug here must not strand requests: the tier is treated as down for good
            log.exception("tier %s: I/O thread failed; treating the tier as down", self.name)
            self._set_state(TierState.DOWN)
            self._fail_all(DropReason.TIER_DOWN)
        finally:
            self._shutdown_requests()
            sock.close(0)

    def _poll_timeout_ms(self, next_heartbeat: float, reconnect_at: Optional[float]) -> int:
        now = time.monotonic()
        wake = [next_heartbeat, now + 0.1]
        if reconnect_at is not None:
            wake.append(reconnect_at)
        if self._in_flight:
            wake.append(min(r.sent_mono for r in self._in_flight.values()) + self.timeout_s)
        return max(0, int((min(wake) - now) * 1000) + 1)

    def _connect(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 2 * self.credit + 16)
        sock.setsockopt(zmq.RCVHWM, 4 * self.credit + 64)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        if self._curve is not None:
            server_key, public, secret = self._curve
            sock.curve_serverkey = server_key
            sock.curve_publickey = public
            sock.curve_secretkey = secret
        sock.connect(self.tier.endpoint)
        return sock

    def _reconnect(self, sock: zmq.Socket) -> zmq.Socket:
        sock.close(0)
        self.stats.reconnects += 1
        return self._connect()

    @staticmethod
    def _curve_keys(server_public_key: Optional[str], client_secret_key: Optional[str]
                    ) -> Optional[tuple[bytes, bytes, bytes]]:
        if not server_public_key:
            return None
        server = load_public_key(server_public_key)
        if client_secret_key:
            public, secret = load_secret_keypair(client_secret_key)
        else:
            log.warning("tier has a server key but no client_secret_key: using a throwaway client key "
                        "(only workers that accept any client will let it in)")
            public, secret = zmq.curve_keypair()
        return server, public, secret

    def _set_state(self, state: TierState) -> None:
        with self._state_changed:
            self._state = state
            self._state_changed.notify_all()

    def _send(self, sock: zmq.Socket, frames: list[bytes]) -> bool:
        try:
            sock.send_multipart(frames, zmq.NOBLOCK)
            return True
        except zmq.ZMQError:      # HWM reached or no connection yet: the request's timer covers it
            self.stats.send_failures += 1
            return False

    def _send_new(self, sock: zmq.Socket) -> None:
        with self._lock:
            new, self._outbox = list(self._outbox), deque()
        for request in new:
            if self.state == TierState.DOWN:
                self._release(request, DropReason.TIER_DOWN, reroutable=True)
            else:
                self._resend(sock, request, first=True)

    def _resend(self, sock: zmq.Socket, request: _Request, first: bool = False) -> None:
        assert request.message is not None
        old_id = request.message.id
        self._in_flight.pop(old_id, None)
        request.message.id = f"{self._id_prefix}.{next(self._ids)}"
        if isinstance(request.message, (p.InferRequest, p.SplitRequest)):
            budget_s = request.item.deadline_mono - time.monotonic()   # inf: batch replay, no deadline
            request.message.budget_ms = max(0.0, budget_s * 1000.0) if math.isfinite(budget_s) else None
        request.sent_mono = time.monotonic()
        self._in_flight[request.message.id] = request
        if not first:
            self.stats.retries += 1
        self.stats.sent += 1
        self.stats.payload_bytes += len(getattr(request.message, "payload", b""))
        self._send(sock, p.encode(request.message))

    def _expire(self, now: float) -> bool:
        """Fail or mark for re-sending the requests past their timeout; True: reconnect and re-send."""
        resend = False
        for rid, request in list(self._in_flight.items()):
            if now - request.sent_mono < self.timeout_s:
                continue
            self.stats.timeouts += 1
            request.attempts_on_tier += 1
            if now > request.item.deadline_mono:
                del self._in_flight[rid]
                self._release(request, DropReason.DEADLINE, reroutable=False)
            elif request.attempts_on_tier > self.retries:
                del self._in_flight[rid]
                self._release(request, DropReason.TIER_DOWN, reroutable=True)
            else:
                resend = True
        return resend

    def _receive(self, sock: zmq.Socket) -> bool:
        heard = False
        for _ in range(1024):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            heard = True
            try:
                message = p.decode(frames, 1 << 31, p.REPLY_KINDS)
            except p.ProtocolError as exc:
                log.warning("tier %s sent a malformed reply: %s", self.name, exc.message)
                continue
            if isinstance(message, p.Heartbeat):
                continue
            request = self._in_flight.pop(message.id, None)
            if request is None:
                self.stats.stale_replies += 1
                continue
            self._on_reply(request, message)
        return heard

    def _on_reply(self, request: _Request, message: p.Message) -> None:
        now = time.monotonic()
        if isinstance(message, p.ErrorReply):
            self.stats.error_replies += 1
            log.debug("tier %s: %s for %s: %s", self.name, message.code, request.port.key, message.message)
            if message.code == p.ErrorCode.DEADLINE:
                self._release(request, DropReason.DEADLINE, reroutable=False)
            elif message.code == p.ErrorCode.BAD_REQUEST:
                self._release(request, DropReason.ERROR, reroutable=False)
            elif message.code == p.ErrorCode.SHUTTING_DOWN:
                self._release(request, DropReason.TIER_DOWN, reroutable=True)
            else:   # busy, model unavailable here, internal: another worker may manage
                self._release(request, DropReason.ERROR if not message.retryable else DropReason.TIER_DOWN,
                              reroutable=True)
            return
        assert isinstance(message, p.Result)
        try:
            output = message.decoded_output()
        except Exception as exc:  # ProtocolError, or anything a hostile or buggy worker can provoke
            log.warning("tier %s: undecodable result for %s: %s", self.name, request.port.key, exc)
            self._release(request, DropReason.ERROR, reroutable=True)
            return
        rtt_ms = (now - request.sent_mono) * 1000.0
        s = self.stats
        s.rtt_ms_ewma = rtt_ms if s.rtt_ms_ewma is None else 0.9 * s.rtt_ms_ewma + 0.1 * rtt_ms
        s.recent_ms.append((rtt_ms, message.queue_ms, message.infer_ms))
        s.completed += 1
        with self._lock:
            self._credit_used -= 1
        if request.claim():
            tier = self.name
            self.callbacks.defer(lambda: _deliver_result(request, output, now, tier))

    def _fail_all(self, reason: DropReason) -> None:
        failed, self._in_flight = list(self._in_flight.values()), {}
        with self._lock:
            queued, self._outbox = list(self._outbox), deque()
        for request in failed + queued:
            self._release(request, reason, reroutable=True)

    def _shutdown_requests(self) -> None:
        failed, self._in_flight = list(self._in_flight.values()), {}
        with self._lock:
            queued, self._outbox = list(self._outbox), deque()
        for request in failed + queued:
            self._release(request, DropReason.SHUTDOWN, reroutable=False)


# ----------------------------------------------------------------------------- several tiers

@dataclass
class GroupStats:
    accepted: int = 0
    out_of_credit: int = 0
    rerouted: int = 0
    fallbacks: dict[str, int] = field(default_factory=dict)


class TierGroup:
    """Spreads one model's traffic over several tiers/workers and moves it off dead ones.

    New items go to the UP client with the most spare credit (CONNECTING ones only when none
    is UP). A request that fails on one tier (down, retries spent, busy) is retried once on each
    other live tier with credit, then goes to the fallback.
    """

    def __init__(self, tiers: Sequence[Any], **client_kwargs: Any):
        if not tiers:
            raise ValueError("a TierGroup needs at least one tier")
        self.callbacks = CallbackThread("offload-group-cb")
        self.clients = [OffloadClient(t, callbacks=self.callbacks, router=self, **client_kwargs) for t in tiers]
        self.stats = GroupStats()
        self._lock = threading.Lock()
        self._turn = itertools.count()

    def start(self) -> "TierGroup":
        for c in self.clients:
            c.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        for c in self.clients:
            c.stop(timeout_s)
        self.callbacks.stop(timeout_s)

    def port(self, model_key: str, fallback: Fallback, **kwargs: Any) -> OffloadPort:
        return OffloadPort(self, model_key, fallback, **kwargs)

    def wait_up(self, timeout_s: float, count: Optional[int] = None) -> bool:
        deadline = time.monotonic() + timeout_s
        need = len(self.clients) if count is None else count
        while time.monotonic() < deadline:
            if sum(c.state == TierState.UP for c in self.clients) >= need:
                return True
            time.sleep(0.02)
        return False

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            group = {"accepted": self.stats.accepted, "out_of_credit": self.stats.out_of_credit,
                     "rerouted": self.stats.rerouted, "fallbacks": dict(self.stats.fallbacks)}
        return {**group, "tiers": {c.name: c.snapshot() for c in self.clients}}

    def _candidates(self, exclude: Sequence[str] = ()) -> list[OffloadClient]:
        usable = [c for c in self.clients if c.name not in exclude and c.state != TierState.DOWN]
        up = [c for c in usable if c.state == TierState.UP] or usable
        turn = next(self._turn)
        rotated = up[turn % len(up):] + up[:turn % len(up)] if up else []
        return sorted(rotated, key=lambda c: c.in_flight / c.credit)

    # ------------------------------------------------------------------ router role
    def accept_new(self, request: _Request) -> bool:
        candidates = self._candidates()
        if not candidates:
            self.callbacks.defer(lambda: self._fall_back(request, DropReason.TIER_DOWN))
            return True
        for client in candidates:
            if client.try_accept(request):
                with self._lock:
                    self.stats.accepted += 1
                return True
        with self._lock:
            self.stats.out_of_credit += 1
        return False

    def failed(self, request: _Request, client: Optional[OffloadClient], reason: DropReason,
               reroutable: bool) -> None:
        if reroutable and client is not None and time.monotonic() < request.item.deadline_mono:
            for other in self._candidates(exclude=request.tiers_tried):
                if other.try_accept(request):
                    with self._lock:
                        self.stats.rerouted += 1
                    log.debug("rerouted a %s request from %s to %s", request.port.key, client.name, other.name)
                    return
        if reason in (DropReason.DEADLINE, DropReason.SHUTDOWN):
            self.callbacks.defer(lambda: _drop_once(request, reason))
        else:
            self.callbacks.defer(lambda: self._fall_back(request, reason))

    def _fall_back(self, request: _Request, reason: DropReason) -> None:
        if not request.claim():
            return
        with self._lock:
            self.stats.fallbacks[reason.value] = self.stats.fallbacks.get(reason.value, 0) + 1
        _run_fallback(request, reason)
