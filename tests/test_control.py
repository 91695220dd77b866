"""The control socket answers every request, however malformed, and keeps serving."""
from __future__ import annotations

import json
import os
import random

import pytest
import zmq

from edgeva.control import ControlError, ControlServer, request


@pytest.fixture
def server(tmp_path):
    calls = {"n": 0}

    def stats(_req):
        calls["n"] += 1
        return {"cameras": {}, "queries": {}, "n": calls["n"]}

    def boom(_req):
        raise RuntimeError("handler bug")

    srv = ControlServer(f"ipc://{tmp_path}/ctl.sock", {"stats": stats, "boom": boom}, max_request_bytes=4096)
    srv.start()
    yield srv
    srv.stop()


def test_valid_commands(server):
    assert request(server.endpoint, {"cmd": "ping"}) == "pong"
    assert request(server.endpoint, {"cmd": "stats"})["n"] == 1


def test_errors_are_replies(server):
    with pytest.raises(ControlError, match="unknown command 'nope'"):
        request(server.endpoint, {"cmd": "nope"})
    with pytest.raises(ControlError, match="boom failed: RuntimeError: handler bug"):
        request(server.endpoint, {"cmd": "boom"})
    with pytest.raises(ControlError, match="exceeds the limit"):
        request(server.endpoint, {"cmd": "stats", "pad": "x" * 10_000})
    assert request(server.endpoint, {"cmd": "stats"})["n"] == 1


def _random_message(rng: random.Random) -> list[bytes]:
    kind = rng.randrange(10)
    if kind == 8:   # nesting deeper than the JSON parser's recursion limit, under the size limit
        depth = rng.randrange(1500, 4000)
        return [rng.choice([b"[" * depth, b'{"a":' * (depth // 5), b"[" * depth + b"]" * depth])]
    if kind == 9:   # a valid object whose value nests too deeply
        return [b'{"cmd": "stats", "x": ' + b"[" * 2000 + b"]" * 2000 + b"}"]
    if kind == 0:
        return [os.urandom(rng.randrange(0, 200))]
    if kind == 1:
        return [json.dumps(rng.choice([[], 1, "stats", None, {"cmd": 5}, {"nocmd": 1}])).encode()]
    if kind == 2:
        return [b'{"cmd": "stats"'[: rng.randrange(1, 15)]]
    if kind == 3:
        return [b"x" * rng.randrange(4097, 200_000)]
    if kind == 4:
        return [b'{"cmd":"stats"}', b"extra frame"]
    if kind == 5:
        return [b""]
    if kind == 6:
        return [b"\xff\xfe" + os.urandom(10)]
    return [json.dumps({"cmd": "".join(rng.choice("abcxyz") for _ in range(5))}).encode()]


def test_fuzz_thousands_of_malformed_messages_then_valid(server):
    rng = random.Random(1234)
    ctx = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVTIMEO, 5000)
    dealer.connect(server.endpoint)
    sent = 3000
    try:
        for _ in range(sent):
            dealer.send_multipart(_random_message(rng))
            reply = json.loads(dealer.recv_multipart()[-1])
            assert reply["ok"] is False and reply["error"]
    finally:
        dealer.close(0)
    assert server.requests_rejected == sent
    # A REQ client still gets a correct answer afterwards.
    assert request(server.endpoint, {"cmd": "stats"})["n"] == 1
    # Raw garbage over a stream socket that is not ZMTP at all must not kill the server either.


def test_deeply_nested_json_under_the_size_limit_gets_an_error_and_the_server_lives(tmp_path):
    srv = ControlServer(f"ipc://{tmp_path}/deep.sock", {"stats": lambda _r: {"n": 1}})   # default 64 KB limit
    srv.start()
    try:
        ctx = zmq.Context.instance()
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.RCVTIMEO, 5000)
        dealer.connect(srv.endpoint)
        try:
            for payload in (b"[" * 60_000, b'{"cmd": "stats", "x": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"):
                assert len(payload) < srv.max_request_bytes
                dealer.send(payload)
                reply = json.loads(dealer.recv_multipart()[-1])
                assert reply["ok"] is False and "nested too deeply" in reply["error"]
        finally:
            dealer.close(0)
        assert request(srv.endpoint, {"cmd": "stats"}) == {"n": 1}
        assert request(srv.endpoint, {"cmd": "ping"}) == "pong"
    finally:
        srv.stop()


def test_a_handler_whose_reply_cannot_be_serialised_gets_an_error(tmp_path):
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    srv = ControlServer(f"ipc://{tmp_path}/reply.sock", {"deep": lambda _r: deep})
    srv.start()
    try:
        with pytest.raises(ControlError, match="not serialisable"):
            request(srv.endpoint, {"cmd": "deep"})
        assert request(srv.endpoint, {"cmd": "ping"}) == "pong"
    finally:
        srv.stop()


def test_second_server_on_same_ipc_path_is_refused(server):
    other = ControlServer(server.endpoint, {})
    with pytest.raises(ControlError, match="already serving"):
        other.start()
    assert request(server.endpoint, {"cmd": "ping"}) == "pong"


def test_client_timeout_is_clear(tmp_path):
    with pytest.raises(ControlError, match=r"no answer .* \(is edgeva running\?\)"):
        request(f"ipc://{tmp_path}/none.sock", {"cmd": "ping"}, timeout_s=0.3)


def test_tcp_garbage_bytes_do_not_stop_the_server():
    import socket
    srv = ControlServer("tcp://127.0.0.1:*", {})
    srv.start()
    try:
        port = int(srv.bound_endpoint.rsplit(":", 1)[1])
        for payload in (b"GET / HTTP/1.1\r\n\r\n", os.urandom(5000), b"\xff" * 64):
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(payload)
        assert request(srv.bound_endpoint, {"cmd": "ping"}) == "pong"
    finally:
        srv.stop()
