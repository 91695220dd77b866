"""Optional Prometheus exposition of the stats snapshot (`stats.prometheus: 127.0.0.1:9108`).

Counters and gauges in the text format, rendered from the same snapshot the control socket
serves, on GET /metrics from a small HTTP server thread.
"""
from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

log = logging.getLogger("edgeva.prometheus")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def render(snapshot: dict[str, Any]) -> str:
    out = _Writer()
    out.metric("edgeva_uptime_seconds", "gauge", "Seconds since the daemon started.", {}, snapshot.get("uptime_s", 0))
    for cam, c in snapshot.get("cameras", {}).items():
        labels = {"camera": cam}
        out.metric("edgeva_camera_frames_delivered_total", "counter", "Frames a camera delivered.", labels,
                   c["frames_delivered"])
        out.metric("edgeva_camera_frames_dropped_buffer_total", "counter",
                   "Frames dropped because the camera buffer was full.", labels, c["frames_dropped_buffer"])
        out.metric("edgeva_camera_reconnects_total", "counter", "Reconnect attempts.", labels, c["reconnects"])
        out.metric("edgeva_camera_fps", "gauge", "Frames per second delivered (10 s window).", labels, c["fps_in"])
        out.metric("edgeva_camera_up", "gauge", "1 while the camera is streaming.", labels,
                   1 if c["state"] == "streaming" else 0)
    for query, q in snapshot.get("queries", {}).items():
        labels = {"query": query, "camera": q["camera"]}
        for outcome in ("inferred", "reused", "offloaded"):
            out.metric("edgeva_query_frames_total", "counter", "Frames per outcome (dropped ones separately).",
                       {**labels, "outcome": outcome}, q[outcome])
        for reason, n in q["dropped"].items():
            out.metric("edgeva_query_dropped_total", "counter", "Frames dropped, by reason.",
                       {**labels, "reason": reason}, n)
        out.metric("edgeva_query_in_flight", "gauge", "Frames on their way through the query.", labels,
                   q["in_flight"])
        out.metric("edgeva_query_fps", "gauge", "Results per second (10 s window).", labels, q["fps_out"])
        lat = q["latency_ms"]
        for quantile in ("p50", "p95", "p99"):
            if lat[quantile] is not None:
                out.metric("edgeva_query_latency_seconds", "summary", "Capture-to-result latency.",
                           {**labels, "quantile": f"0.{quantile[1:]}"}, lat[quantile] / 1000.0)
        out.metric("edgeva_query_latency_seconds_count", None, "", labels, lat["count"])
        filt = q.get("filter")
        if isinstance(filt, dict):
            for reason, n in (filt.get("kept_by_reason") or {}).items():
                out.metric("edgeva_query_filter_kept_total", "counter",
                           "Frames the filter sent to the model, by reason (shared: another query's run).",
                           {**labels, "reason": reason}, n)
            for reason, n in (filt.get("reused_by_reason") or {}).items():
                out.metric("edgeva_query_filter_reused_total", "counter",
                           "Frames the filter answered with the last result, by reason.",
                           {**labels, "reason": reason}, n)
        if isinstance(filt, dict) and filt.get("audited_agreement") is not None:
            out.metric("edgeva_query_audited_agreement", "gauge",
                       "Agreement of reused results with the model on audited frames.", labels,
                       filt["audited_agreement"])
            out.metric("edgeva_query_filter_threshold", "gauge", "Current filter threshold.", labels,
                       filt.get("threshold") or 0)
    results = snapshot.get("results")
    if isinstance(results, dict):
        for sink, counts in results.get("sinks", {}).items():
            out.metric("edgeva_results_written_total", "counter", "Result records a sink kept.", {"sink": sink},
                       counts.get("written", 0))
            out.metric("edgeva_results_lost_total", "counter",
                       "Result records a sink lost (full disk, full queue, failed write).", {"sink": sink},
                       counts.get("lost", 0))
    memory = snapshot.get("memory", {})
    inner = memory.get("memory", memory) if isinstance(memory, dict) else {}
    for key in ("resident_bytes", "peak_resident_bytes", "budget_bytes", "loads", "evictions", "bytes_loaded"):
        if isinstance(inner.get(key), (int, float)):
            kind = "counter" if key in ("loads", "evictions", "bytes_loaded") else "gauge"
            name = f"edgeva_memory_{key}" + ("_total" if kind == "counter" else "")
            out.metric(name, kind, f"Model memory: {key.replace('_', ' ')}.", {}, inner[key])
    return out.text()


class _Writer:
    def __init__(self) -> None:
        self._lines: list[str] = []
        self._declared: set[str] = set()

    def metric(self, name: str, kind: str | None, help_text: str, labels: dict[str, str], value: Any) -> None:
        if kind is not None and name not in self._declared:
            self._declared.add(name)
            self._lines.append(f"# HELP {name} {help_text}")
            self._lines.append(f"# TYPE {name} {kind}")
        label_text = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
        self._lines.append(f"{name}{{{label_text}}} {float(value):g}" if label_text else f"{name} {float(value):g}")

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class PrometheusServer:
    """GET /metrics on host:port; anything else is 404. Runs in its own thread."""

    def __init__(self, address: str, snapshot: Callable[[], dict[str, Any]]):
        host, _, port = address.rpartition(":")
        snapshot_fn = snapshot

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics is served")
                    return
                body = render(snapshot_fn()).encode()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("prometheus %s", fmt % args)

        self._server = ThreadingHTTPServer((host or "127.0.0.1", int(port)), Handler)
        self._server.daemon_threads = True
        self.address = f"{self._server.server_address[0]}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="prometheus", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("prometheus metrics on http://%s/metrics", self.address)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
