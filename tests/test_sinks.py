"""Result sinks: SQLite batches survive a kill -9 (at most the last batch lost), ZeroMQ PUB delivers."""
from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import zmq

from edgeva.messages import Outcome, QueryResult
from edgeva.sinks import SQLiteSink, ZmqPubSink, read_results


def _result(i: int, query: str = "q") -> QueryResult:
    return QueryResult(query, "cam", i, 1000.0 + i, Outcome.INFERRED if i % 3 else Outcome.REUSED,
                       {"car": i % 5}, 0.012, i % 3, i - i % 3)


def test_sqlite_roundtrip_and_filters(tmp_path):
    db = tmp_path / "r.db"
    sink = SQLiteSink(db, batch=10, flush_s=0.05)
    for i in range(95):
        sink.write(_result(i, "a" if i % 2 else "b"))
    sink.close()
    assert sink.written == 95 and sink.dropped == 0
    rows = list(read_results(db, query="a", limit=1000))
    assert len(rows) == 47 and rows[0]["seq"] == 93 and rows[0]["value"] == {"car": 3}
    assert {r["outcome"] for r in rows} == {"inferred", "reused"}
    assert conn_mode(db) == "wal"


def conn_mode(db) -> str:
    with sqlite3.connect(db) as c:
        return c.execute("PRAGMA journal_mode").fetchone()[0]


def test_sqlite_survives_kill_9_losing_at_most_the_last_batch(tmp_path):
    db = tmp_path / "k.db"
    progress = tmp_path / "progress"
    batch = 20
    script = textwrap.dedent(f"""
        import os, time
        from edgeva.messages import Outcome, QueryResult
        from edgeva.sinks import SQLiteSink
        sink = SQLiteSink({str(db)!r}, batch={batch}, flush_s=60)
        i = 0
        while True:
            sink.write(QueryResult("q", "cam", i, float(i), Outcome.INFERRED, {{"n": i}}, 0.01))
            i += 1
            if i % 50 == 0:
                while sink._queue.qsize():   # everything but the writer's open batch is committed
                    time.sleep(0.001)
                open({str(progress)!r} + ".tmp", "w").write(str(i))
                os.replace({str(progress)!r} + ".tmp", {str(progress)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not progress.exists() or int(progress.read_text() or 0) < 2000):
        time.sleep(0.05)
    written_before_kill = int(progress.read_text())
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        n, max_seq = c.execute("SELECT count(*), max(seq) FROM results").fetchone()
    # Rows are committed in order and whole batches only.
    assert n == max_seq + 1 and n % batch == 0
    # At the last progress mark the queue was empty: only the writer's open batch was uncommitted.
    assert n >= written_before_kill - batch


def test_zmq_pub_delivers_by_topic():
    ctx = zmq.Context.instance()
    sink = ZmqPubSink("tcp://127.0.0.1:*")
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVTIMEO, 3000)
    sub.setsockopt(zmq.SUBSCRIBE, b"cars")
    sub.connect(sink.endpoint)
    try:
        deadline = time.monotonic() + 5
        got = None
        while got is None and time.monotonic() < deadline:  # slow-joiner: publish until it arrives
            sink.write(_result(7, "people"))
            sink.write(_result(7, "cars"))
            try:
                got = sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                time.sleep(0.02)
        assert got is not None
        topic, payload = got
        assert topic == b"cars"
        record = json.loads(payload)
        assert record["query"] == "cars" and record["seq"] == 7 and record["value"] == {"car": 2}
    finally:
        sub.close(0)
        sink.close()


def test_sqlite_retention_deletes_old_results(tmp_path):
    db = tmp_path / "old.db"
    now = time.time()
    sink = SQLiteSink(db, batch=5, flush_s=0.05, retention_s=3600)
    sink.PRUNE_EVERY_S = 0.05
    for i in range(10):
        r = _result(i)
        r.t_capture = now - 7200 if i < 6 else now      # six results two hours old
        sink.write(r)
    deadline = time.monotonic() + 5
    while sink.pruned < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
        fresh = _result(100)
        fresh.t_capture = time.time()
        sink.write(fresh)                              # keeps the writer loop turning
    sink.close()
    assert sink.pruned == 6
    seqs = {r["seq"] for r in read_results(db, limit=100)}
    assert seqs >= {6, 7, 8, 9} and not seqs & set(range(6))
