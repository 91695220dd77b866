"""The daemon's control socket: JSON commands over ZeroMQ (stats, health, config, ping).

The server is a ROUTER, not a REP: a REP socket answers strictly in lock-step, so a
client that sends a multi-part or half-finished request, or disconnects before reading,
can leave it in a state where the next request fails. A ROUTER keeps each request
independent, serves many clients, and can answer anything it receives, however
malformed, with an error reply. Clients may be REQ (envelope with an empty delimiter)
or DEALER (identity only); the reply mirrors the envelope it came with.

Request:  one frame, a JSON object {"cmd": "stats" | "health" | "config" | "ping", ...}
Reply:    one frame, {"ok": true, "data": ...} or {"ok": false, "error": "..."}
"""
from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable

import zmq

log = logging.getLogger("edgeva.control")

# Beyond this the transport drops the connection without reading the message; up to
# it, oversized requests (max_request_bytes) get an error reply.
TRANSPORT_MAX_BYTES = 1 << 20

Handler = Callable[[dict[str, Any]], Any]


class ControlError(RuntimeError):
    pass


def runtime_dir() -> Path:
    """Where the ipc socket lives: systemd's RuntimeDirectory, else XDG_RUNTIME_DIR, else /tmp."""
    if os.environ.get("RUNTIME_DIRECTORY"):
        return Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0])
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "edgeva"
    return Path(f"/tmp/edgeva-{os.getuid()}")


def resolve_endpoint(template: str) -> str:
    """Expand {runtime_dir} and make sure an ipc socket's folder exists (mode 0700)."""
    endpoint = template.replace("{runtime_dir}", str(runtime_dir()))
    if endpoint.startswith("ipc://"):
        folder = Path(endpoint[len("ipc://"):]).parent
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return endpoint


class ControlServer:
    """Serves JSON commands on a ROUTER socket from its own thread until stop()."""

    def __init__(self, endpoint: str, handlers: dict[str, Handler], max_request_bytes: int = 64 * 1024,
                 context: zmq.Context | None = None):
        self.endpoint = resolve_endpoint(endpoint)
        self.handlers = dict(handlers)
        self.handlers.setdefault("ping", lambda _req: "pong")
        self.max_request_bytes = max_request_bytes
        self.requests_served = 0
        self.requests_rejected = 0
        self._ctx = context or zmq.Context.instance()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._socket: zmq.Socket | None = None
        self.bound_endpoint: str | None = None

    def start(self) -> None:
        if self.endpoint.startswith("ipc://") and _ipc_in_use(self._ctx, self.endpoint):
            raise ControlError(f"another edgeva is already serving on {self.endpoint}")
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, TRANSPORT_MAX_BYTES)
        sock.setsockopt(zmq.SNDHWM, 1000)
        try:
            sock.bind(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise ControlError(f"cannot bind control socket {self.endpoint}: {exc}") from None
        if self.endpoint.startswith("ipc://"):
            os.chmod(self.endpoint[len("ipc://"):], 0o660)
        self.bound_endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._socket = sock
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()
        log.info("control socket on %s", self.bound_endpoint)

    def alive(self) -> bool:
        """The serving thread runs (started and not dead)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.endpoint.startswith("ipc://"):
            Path(self.endpoint[len("ipc://"):]).unlink(missing_ok=True)

    def _serve(self) -> None:
        assert self._socket is not None
        sock = self._socket
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(200):
                    continue
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        self._answer(sock, frames)
                    except Exception:   # never on input (handle() answers everything); a bug here
                        log.exception("control: answering a request failed")   # must not end the thread
        finally:
            sock.close(0)

    def _answer(self, sock: zmq.Socket, frames: list[bytes]) -> None:
        envelope, body = _split_envelope(frames)
        try:
            reply = self.handle(body)
        except Exception as exc:   # handle() catches everything it expects; this is the last line
            log.exception("control: request handling failed")
            reply = _error(f"internal error: {type(exc).__name__}")
        if reply.get("ok"):
            self.requests_served += 1
        else:
            self.requests_rejected += 1
        try:
            data = json.dumps(reply, default=str).encode()
        except (TypeError, ValueError, RecursionError) as exc:
            data = json.dumps({"ok": False, "error": f"reply not serialisable: {type(exc).__name__}: {exc}"}).encode()
        try:
            sock.send_multipart(envelope + [data], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the client went away or is not reading; nothing to do

    def handle(self, body: list[bytes]) -> dict[str, Any]:
        """Turn one request (its payload frames) into a reply; never raises."""
        if len(body) != 1:
            return _error(f"expected exactly one frame with a JSON object, got {len(body)} frames")
        raw = body[0]
        if len(raw) > self.max_request_bytes:
            return _error(f"request of {len(raw)} bytes exceeds the limit of {self.max_request_bytes}")
        try:
            request = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return _error(f"request is not JSON: {exc}")
        except RecursionError:   # e.g. 60 KB of '[[[[': deeper than the parser's recursion limit
            return _error("request is not JSON this server accepts: nested too deeply")
        except Exception as exc:  # anything else the parser can raise on hostile input
            return _error(f"request is not JSON: {type(exc).__name__}: {exc}")
        if not isinstance(request, dict):
            return _error("request must be a JSON object like {\"cmd\": \"stats\"}")
        cmd = request.get("cmd")
        if not isinstance(cmd, str) or cmd not in self.handlers:
            known = ", ".join(sorted(self.handlers))
            return _error(f"unknown command {cmd!r}; known: {known}")
        try:
            return {"ok": True, "data": self.handlers[cmd](request)}
        except Exception as exc:  # a handler bug answers as an error; the server keeps serving
            log.exception("control command %s failed", cmd)
            return _error(f"{cmd} failed: {type(exc).__name__}: {exc}")


def _split_envelope(frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    identity, rest = frames[:1], frames[1:]
    if rest and rest[0] == b"":  # REQ client: identity, empty delimiter, body
        return identity + [b""], rest[1:]
    return identity, rest


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


def _ipc_in_use(ctx: zmq.Context, endpoint: str) -> bool:
    path = Path(endpoint[len("ipc://"):])
    if not path.exists():
        return False
    try:
        request(endpoint, {"cmd": "ping"}, timeout_s=0.5, context=ctx)
        return True
    except ControlError:
        return False


def request(endpoint: str, message: dict[str, Any], timeout_s: float = 3.0,
            context: zmq.Context | None = None) -> Any:
    """Send one command and return its data; ControlError on timeout or an error reply."""
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
    sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
    try:
        sock.connect(endpoint)
        sock.send(json.dumps(message).encode())
        try:
            raw = sock.recv()
        except zmq.Again:
            raise ControlError(f"no answer from {endpoint} within {timeout_s:g} s (is edgeva running?)") from None
    finally:
        sock.close(0)
    reply = json.loads(raw)
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "unknown error"))
    return reply.get("data")
