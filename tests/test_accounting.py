"""The accounting identity frames_in == inferred + reused + offloaded + dropped + in_flight is a
real check: in_flight is counted where frames enter and leave, so lost and double-counted
frames are caught."""
from __future__ import annotations

import logging
import threading
import time

import numpy as np
import yaml

from edgeva.config import load_config
from edgeva.daemon import Daemon
from edgeva.messages import DropReason, Outcome
from edgeva.stats import StatsRegistry
from edgeva.systemd import Notifier
from tests.blob_model import BlobDetector
from tests.conftest import write_test_clip


def _registry(frames: int) -> tuple[StatsRegistry, object]:
    stats = StatsRegistry(stuck_after_s=3600)
    stats.add_camera("cam", "x.mp4")
    qs = stats.add_query("q", "cam")
    for seq in range(frames):
        stats.frame_delivered("cam", seq)
    return stats, qs


def test_a_lost_frame_hidden_by_a_double_count_is_caught():
    """Frame 3 never gets an outcome and frame 2 gets two: frames_in minus the buckets is 0, so the
    derived in_flight said all was well; the ledger sees both."""
    stats, qs = _registry(5)
    for seq in (0, 1, 2, 2, 4):
        stats.record(qs, Outcome.INFERRED, 0.01, seq=seq)
    errors = stats.accounting_errors()
    assert errors and "bucketed without being in flight" in errors[0]
    snap = stats.snapshot()["queries"]["q"]
    assert snap["in_flight"] == 1 and snap["frames_in"] != snap["inferred"] + snap["in_flight"]


def test_a_lost_frame_is_named_after_a_stop_and_reported_when_stuck():
    stats, qs = _registry(4)
    for seq in (0, 1):
        stats.record(qs, Outcome.REUSED, 0.01, seq=seq)
    stats.stuck_after_s = 0.0
    assert stats.accounting_errors() == []     # 2 and 3 are slow, not stuck: nothing newer went past them
    stats.record(qs, Outcome.REUSED, 0.01, seq=3)
    assert "frame cam:2 in flight for" in stats.accounting_errors()[0]     # 3 overtook it
    stats.stuck_after_s = 3600.0
    assert stats.accounting_errors() == []               # frame 2 may still be on its way
    assert stats.accounting_errors(stopped=True) == ["q: 1 frames never got an outcome (lost: cam:2)"]
    stats.record(qs, Outcome.DROPPED, reason=DropReason.ERROR, seq=2)
    assert stats.accounting_errors(stopped=True) == []


class _LossyPort:
    """An executor with a bug: it accepts frame 7 and never calls back."""

    def __init__(self, inner):
        self.inner, self.key, self.model = inner, inner.key, inner.model
        self.lost = []

    def submit(self, item, wait_s=0.0):
        if item.frame.seq == 7 and not item.audit:
            self.lost.append(item.frame.seq)
            return True
        return self.inner.submit(item, wait_s)


def test_a_frame_an_executor_loses_is_caught_by_the_daemon(tmp_path, monkeypatch, caplog):
    blob = BlobDetector(np.full((120, 160, 3), 90, np.uint8))
    monkeypatch.setattr("edgeva.models.build_model", lambda *a, **k: blob)
    clip = write_test_clip(tmp_path / "c.mp4", frames=20, fps=25)
    cfg_path = tmp_path / "edgeva.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "cameras": [{"id": "cam", "source": str(clip), "replay": "fast"}],
        "queries": [{"id": "cars", "camera": "cam", "model": "yolov8n", "task": {"type": "count", "classes": ["car"]},
                     "filter": {"enabled": False}}],
        "stats": {"endpoint": f"ipc://{tmp_path}/ctl.sock"}}))
    daemon = Daemon(load_config(cfg_path), notifier=Notifier({}))
    build = daemon._build_query
    ports = []

    def lossy(q, **kwargs):
        runtime = build(q, **kwargs)
        runtime.worker = _LossyPort(runtime.worker)
        ports.append(runtime.worker)
        return runtime

    daemon._build_query = lossy   # type: ignore[method-assign]
    daemon.UNTIL_END_STALL_S = 1.0
    daemon.start()
    with caplog.at_level(logging.ERROR, logger="edgeva.daemon"):
        daemon.serve(max_runtime_s=60, exit_when_sources_end=True)   # the stall ends it, not the 60 s
    assert "in flight without any outcome" in caplog.text
    assert ports[0].lost == [7]
    s = daemon.stats.snapshot()["queries"]["cars"]
    assert s["frames_in"] == 20 and s["inferred"] == 19 and s["in_flight"] == 1
    assert daemon.stats.accounting_errors(stopped=True) == ["cars: 1 frames never got an outcome (lost: cam:7)"]
    assert "accounting inconsistent: cars: 1 frames never got an outcome (lost: cam:7)" in caplog.text


class _FullDiskSink:
    """A sink on a full disk: every write fails."""

    def write(self, result):
        raise OSError(28, "No space left on device")

    def close(self):
        pass


def test_results_a_sink_loses_show_in_stats_and_health(tmp_path):
    from edgeva.control import request

    clip = write_test_clip(tmp_path / "c.mp4", frames=30, fps=30)
    cfg_path = tmp_path / "edgeva.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "cameras": [{"id": "cam", "source": str(clip), "loop": True}],
        "queries": [{"id": "frames", "camera": "cam", "task": {"type": "passthrough"}}],
        "stats": {"endpoint": f"ipc://{tmp_path}/ctl.sock"}}))
    daemon = Daemon(load_config(cfg_path), notifier=Notifier({}))
    daemon.hub.add_sink(_FullDiskSink())
    daemon.start()
    try:
        endpoint = daemon.control.bound_endpoint
        deadline = time.monotonic() + 15
        while request(endpoint, {"cmd": "stats"})["results"]["lost"] < 10:
            assert time.monotonic() < deadline, "no lost results counted"
            time.sleep(0.05)
        health = request(endpoint, {"cmd": "health"})
        snap = request(endpoint, {"cmd": "stats"})
    finally:
        daemon.request_stop()
        daemon.serve()
    assert health["status"] == "degraded" and health["losing_results"] and health["results_lost"] >= 10
    assert snap["results"]["sinks"]["_FullDiskSink"]["lost"] >= 10 and snap["results"]["losing"]


def test_a_stats_snapshot_reads_a_query_gauge_while_that_query_records_a_result():
    # A query's filter gauge takes the query's lock; the query records its results into the
    # registry while holding that lock. A snapshot that called the gauge under the registry's
    # lock deadlocked against it (a daemon's batch run hung on 2026-12-02 this way).
    stats = StatsRegistry()
    qs = stats.add_query("q", "cam")
    query_lock = threading.Lock()
    in_gauge = threading.Event()

    def filter_gauge() -> dict:
        in_gauge.set()
        with query_lock:
            return {"state": "filtering"}

    stats.set_gauges("q", filter=filter_gauge)

    holding = threading.Event()

    def complete() -> None:             # what ModelQuery.complete does, the query's lock held
        with query_lock:
            holding.set()
            in_gauge.wait(5)
            stats.record(qs, Outcome.INFERRED, 0.01, seq=None)

    snapshots: list = []
    threads = [threading.Thread(target=complete, daemon=True),
               threading.Thread(target=lambda: snapshots.append(stats.snapshot()), daemon=True)]
    threads[0].start()
    assert holding.wait(5)
    threads[1].start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads), "snapshot and record deadlocked"
    assert snapshots[0]["queries"]["q"]["filter"] == {"state": "filtering"}
