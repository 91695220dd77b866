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
    assert sink.written == 95 and sink.lost == 0
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


def test_an_older_results_file_gains_the_new_columns_and_dropped_records_keep_their_reason(tmp_path):
    db = tmp_path / "old-schema.db"
    conn = sqlite3.connect(db)
    conn.executescript("CREATE TABLE results (id INTEGER PRIMARY KEY, query TEXT NOT NULL, camera TEXT NOT NULL, "
                       "seq INTEGER NOT NULL, t_capture REAL NOT NULL, outcome TEXT NOT NULL, value TEXT, "
                       "latency_ms REAL, age_frames INTEGER, source_seq INTEGER);"
                       "INSERT INTO results (query, camera, seq, t_capture, outcome) VALUES ('q', 'cam', 0, 1.0, 'inferred');")
    conn.close()
    assert next(read_results(db, limit=1))["reason"] is None          # readable before the migration
    sink = SQLiteSink(db, batch=1, flush_s=0.05)
    sink.write(QueryResult("q", "cam", 1, 2.0, Outcome.DROPPED, None, 0.5, extra={"reason": "deadline"},
                           clip="a.mp4", t_media=0.04))
    sink.close()
    newest = next(read_results(db, limit=1))
    assert (newest["outcome"], newest["reason"], newest["clip"], newest["t_media"]) == ("dropped", "deadline", "a.mp4", 0.04)


FULL_DISK_SCRIPT = textwrap.dedent("""
    import resource, signal, sys, time
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)       # a write past the limit fails with EFBIG instead
    from edgeva.messages import Outcome, QueryResult
    from edgeva.results import ResultHub
    from edgeva.sinks import SQLiteSink
    sink = SQLiteSink(sys.argv[1], batch=20, flush_s=0.02)
    hub = ResultHub()
    hub.add_sink(sink)
    time.sleep(0.2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (96 * 1024, resource.RLIM_INFINITY))   # the disk is now full
    for i in range(3000):
        hub.emit(QueryResult("q", "cam", i, float(i), Outcome.INFERRED, {"pad": "x" * 200}, 0.01))
        if i % 100 == 0:
            time.sleep(0.01)
    hub.close()
    s = hub.stats()
    print(s["lost"], s["sinks"]["SQLiteSink"]["written"], s["losing"])
""")


def test_a_full_disk_is_counted_as_lost_results(tmp_path):
    out = subprocess.run([sys.executable, "-c", FULL_DISK_SCRIPT, str(tmp_path / "full.db")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lost, written, losing = out.stdout.split()
    assert int(lost) > 0 and int(lost) + int(written) == 3000 and losing == "True", out.stdout
    assert "results lost" in out.stderr


class _FailingSink:
    def __init__(self):
        self.calls = 0

    def write(self, result):
        self.calls += 1
        raise OSError(28, "No space left on device")

    def close(self):
        pass


def test_a_sink_whose_writes_fail_is_counted_and_losing_clears_after_the_window():
    from edgeva.results import ResultHub

    now = [0.0]
    hub = ResultHub(clock=lambda: now[0])
    failing = _FailingSink()
    hub.add_sink(failing)
    assert not hub.losing()
    for i in range(5):
        hub.emit(_result(i))
    assert failing.calls == 5 and hub.lost() == 5 and hub.losing(window_s=60)
    now[0] = 30.0
    assert hub.losing(window_s=60)
    now[0] = 61.0
    assert not hub.losing(window_s=60)
    assert hub.stats()["sinks"]["_FailingSink"]["lost"] == 5
