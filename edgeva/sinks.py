"""Result sinks: SQLite (the embedded default) and a ZeroMQ PUB stream."""
from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import zmq

from edgeva.messages import QueryResult

log = logging.getLogger("edgeva.sinks")

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    id          INTEGER PRIMARY KEY,
    query       TEXT NOT NULL,
    camera      TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    t_capture   REAL NOT NULL,
    outcome     TEXT NOT NULL,
    value       TEXT,
    latency_ms  REAL,
    age_frames  INTEGER,
    source_seq  INTEGER,
    reason      TEXT,
    clip        TEXT,
    t_media     REAL
);
CREATE INDEX IF NOT EXISTS results_query_time ON results (query, t_capture);
CREATE INDEX IF NOT EXISTS results_time ON results (t_capture);
"""
# Columns added after the first release: an older results file gets them on open.
_ADDED_COLUMNS = {"reason": "TEXT", "clip": "TEXT", "t_media": "REAL"}
_COLUMNS = ("query", "camera", "seq", "t_capture", "outcome", "value", "latency_ms", "age_frames", "source_seq",
            *_ADDED_COLUMNS)

_INSERT = f"INSERT INTO results ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' for _ in _COLUMNS)})"


class SQLiteSink:
    """Appends results from a writer thread in batched transactions (WAL).

    A kill -9 loses at most the records not yet committed: the current batch, bounded
    by `batch` records or `flush_s` seconds. The queue is bounded; when the disk cannot
    keep up, records are dropped and counted rather than growing memory without end, and a
    batch whose commit fails (a full disk) is counted too: `lost` is every record accepted
    by write() that will never be in the file.
    """

    PRUNE_EVERY_S = 600.0

    def __init__(self, path: str | Path, batch: int = 64, flush_s: float = 1.0, max_pending: int = 100_000,
                 retention_s: float | None = None):
        self.path = Path(path)
        self.retention_s = retention_s       # results older than this (by capture time) are deleted
        self.pruned = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.batch = batch
        self.flush_s = flush_s
        self.written = 0
        self.lost = 0
        self._queue: queue.Queue[tuple | None] = queue.Queue(maxsize=max_pending)
        conn = _connect(self.path)
        conn.executescript(SCHEMA)
        _add_missing_columns(conn)
        conn.close()
        self._thread = threading.Thread(target=self._run, name="sink-sqlite", daemon=True)
        self._thread.start()

    def write(self, result: QueryResult) -> None:
        row = (result.query, result.camera, result.seq, result.t_capture, result.outcome.value,
               json.dumps(result.value, default=_jsonable), round(result.latency_s * 1000.0, 3),
               result.age_frames, result.source_seq, result.reason, result.clip, result.t_media)
        try:
            self._queue.put_nowait(row)
        except queue.Full:
            self.lost += 1

    def counts(self) -> dict[str, int]:
        return {"written": self.written, "lost": self.lost, "queued": self._queue.qsize()}

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        conn = _connect(self.path)
        pending: list[tuple] = []
        deadline = time.monotonic() + self.flush_s
        next_prune = time.monotonic()
        done = False
        while not done:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                if item is None:
                    done = True
                else:
                    pending.append(item)
            except queue.Empty:
                pass
            if pending and (done or len(pending) >= self.batch or time.monotonic() >= deadline):
                try:
                    with conn:
                        conn.executemany(_INSERT, pending)
                    self.written += len(pending)
                except sqlite3.Error as exc:
                    self.lost += len(pending)
                    if self.lost == len(pending) or self.lost // 1000 != (self.lost - len(pending)) // 1000:
                        log.error("sqlite sink %s: %d results lost (%d so far): %s", self.path, len(pending),
                                  self.lost, exc)
                pending = []
            if time.monotonic() >= deadline:
                deadline = time.monotonic() + self.flush_s
            if self.retention_s is not None and time.monotonic() >= next_prune:
                next_prune = time.monotonic() + self.PRUNE_EVERY_S
                self._prune(conn)
        conn.close()

    def _prune(self, conn: sqlite3.Connection) -> None:
        try:
            with conn:
                cur = conn.execute("DELETE FROM results WHERE t_capture < ?", (time.time() - self.retention_s,))
            self.pruned += cur.rowcount
            if cur.rowcount:
                conn.execute("PRAGMA incremental_vacuum").fetchall()   # each row frees a page: step it through
        except sqlite3.Error:
            log.exception("sqlite sink: pruning old results failed")


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=10, check_same_thread=False)
    conn.execute("PRAGMA auto_vacuum=INCREMENTAL")   # takes effect on a new file: pruned pages go back
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    have = {row[1] for row in conn.execute("PRAGMA table_info(results)")}
    with conn:
        for name, kind in _ADDED_COLUMNS.items():
            if name not in have:
                conn.execute(f"ALTER TABLE results ADD COLUMN {name} {kind}")


def read_results(path: str | Path, query: str | None = None, limit: int = 50,
                 since: float | None = None) -> Iterator[dict[str, Any]]:
    """Newest first; opened read-only so it can run beside the daemon."""
    conn = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True, timeout=10)
    try:
        have = {row[1] for row in conn.execute("PRAGMA table_info(results)")}
        added = ", ".join(name if name in have else f"NULL AS {name}" for name in _ADDED_COLUMNS)
        where, args = [], []
        if query:
            where.append("query = ?")
            args.append(query)
        if since is not None:
            where.append("t_capture >= ?")
            args.append(since)
        sql = f"SELECT query, camera, seq, t_capture, outcome, value, latency_ms, age_frames, source_seq, {added} " \
              f"FROM results"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        for row in conn.execute(sql, args):
            yield {"query": row[0], "camera": row[1], "seq": row[2], "t_capture": row[3], "outcome": row[4],
                   "value": json.loads(row[5]) if row[5] else None, "latency_ms": row[6],
                   "age_frames": row[7], "source_seq": row[8], "reason": row[9], "clip": row[10], "t_media": row[11]}
    finally:
        conn.close()


class ZmqPubSink:
    """Publishes each result as [topic=query id, JSON]; slow subscribers lose messages, never block us."""

    def __init__(self, endpoint: str, context: zmq.Context | None = None):
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 10_000)
        self._sock.bind(endpoint)
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._lock = threading.Lock()   # results arrive from several executor threads
        self.published = 0
        self.lost = 0                   # refused by the socket (PUB drops for slow subscribers unseen)

    def write(self, result: QueryResult) -> None:
        payload = json.dumps(result.to_dict(), default=_jsonable).encode()
        with self._lock:
            try:
                self._sock.send_multipart([result.query.encode(), payload], zmq.NOBLOCK)
                self.published += 1
            except zmq.Again:
                self.lost += 1

    def counts(self) -> dict[str, int]:
        return {"written": self.published, "lost": self.lost}

    def close(self) -> None:
        with self._lock:
            self._sock.close(0)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)
