"""Prometheus exposition: the daemon serves /metrics in the text format, from the same counters."""
from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request

import pytest
import yaml

from edgeva.config import load_config
from edgeva.daemon import Daemon
from edgeva.systemd import Notifier
from tests.conftest import write_test_clip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_endpoint_serves_the_stats(tmp_path):
    clip = write_test_clip(tmp_path / "c.mp4", frames=30, fps=30)
    port = _free_port()
    cfg_path = tmp_path / "edgeva.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "cameras": [{"id": "cam", "source": str(clip), "loop": True}],
        "queries": [{"id": "frames", "camera": "cam"}],
        "sinks": {"sqlite": str(tmp_path / "r.db"), "flush_s": 0.05},
        "stats": {"endpoint": f"ipc://{tmp_path}/ctl.sock", "prometheus": f"127.0.0.1:{port}"}}))
    daemon = Daemon(load_config(cfg_path), notifier=Notifier({}))
    daemon.start()
    try:
        deadline = time.monotonic() + 10
        while daemon.stats.snapshot()["queries"]["frames"]["inferred"] < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = resp.read().decode()
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=5)
    finally:
        daemon.request_stop()
        daemon.serve()
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert float(lines['edgeva_query_frames_total{query="frames",camera="cam",outcome="inferred"}']) >= 10
    assert float(lines['edgeva_camera_frames_delivered_total{camera="cam"}']) >= 10
    assert 'edgeva_query_latency_seconds{query="frames",camera="cam",quantile="0.95"}' in lines
    assert "# TYPE edgeva_query_frames_total counter" in text
    assert float(lines['edgeva_results_lost_total{sink="SQLiteSink"}']) == 0
    assert 'edgeva_results_written_total{sink="SQLiteSink"}' in lines


def test_bad_prometheus_address_names_the_key(tmp_path):
    from edgeva.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as err:
        parse_config({"stats": {"prometheus": "localhost"}})
    assert err.value.path == "stats.prometheus"


def test_filter_decisions_are_exported_by_reason():
    """An operator sees where a query's model runs come from, shared ones among them."""
    from edgeva.prometheus import render

    latency = {"p50": None, "p95": None, "p99": None, "count": 0}
    snapshot = {"queries": {"persons": {
        "camera": "cam", "inferred": 9, "reused": 11, "offloaded": 0, "dropped": {}, "in_flight": 0, "fps_out": 0.0,
        "latency_ms": latency, "filter": {"kept_by_reason": {"threshold": 3, "shared": 6},
                                          "reused_by_reason": {"below_threshold": 11}}}}}
    lines = dict(line.rsplit(" ", 1) for line in render(snapshot).splitlines() if not line.startswith("#"))
    assert lines['edgeva_query_filter_kept_total{query="persons",camera="cam",reason="shared"}'] == "6"
    assert lines['edgeva_query_filter_kept_total{query="persons",camera="cam",reason="threshold"}'] == "3"
    assert lines['edgeva_query_filter_reused_total{query="persons",camera="cam",reason="below_threshold"}'] == "11"
