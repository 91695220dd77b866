"""The daemon: wiring, lifecycle, signals (SIGTERM/SIGINT stop, SIGHUP reload), systemd notify."""
from __future__ import annotations

import json
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from edgeva import __version__
from edgeva.config import CameraConfig, Config, ConfigError, QueryConfig, load_config, looks_ahead, model_key
from edgeva.control import ControlServer
from edgeva.deployment import CameraChanges, Deployment, SplitPlacement, camera_changes, prepare
from edgeva.health import ErrorWatch
from edgeva.pipeline import CameraPipeline, QueryRuntime
from edgeva.pool import ModelPool
from edgeva.progress import BatchProgress
from edgeva.query import ModelQuery, PassthroughQuery
from edgeva.redaction import redact_sources
from edgeva.results import ResultHub
from edgeva.router import Route
from edgeva.source_kind import SourceKind, classify_source
from edgeva.stats import StatsRegistry
from edgeva.systemd import Notifier

log = logging.getLogger("edgeva.daemon")

RANDOM_WEIGHTS = "random init"   # what stats show for a model built from its architecture alone


class Daemon:
    """Owns every running part. The only long-lived state in the process lives here."""

    RESTART_CHECK_S = 5.0   # how often cameras whose reader crashed are restarted
    PROGRESS_INTERVAL_S = 5.0   # the progress line of a batch run (--until-end)
    UNTIL_END_STALL_S = 120.0   # sources ended and no frame got an outcome for this long: stop anyway

    def __init__(self, cfg: Config, notifier: Notifier | None = None,
                 config_loader: Callable[[str], Config] = load_config):
        self.cfg = cfg
        self.notifier = notifier or Notifier()
        self.stats = StatsRegistry()
        self.hub = ResultHub()
        self.cameras: dict[str, CameraPipeline] = {}
        self.models = ModelPool()
        self.routes: dict[str, Route] = {}
        self.splits: dict[str, SplitPlacement] = {}
        self.errors = ErrorWatch()
        self._running_cfg: Config | None = None   # what is applied (None before start)
        self.tier_groups: dict[tuple[str, ...], Any] = {}   # tiers -> TierGroup
        self.control: ControlServer | None = None
        self.prometheus: Any = None
        self._config_loader = config_loader
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._lock = threading.Lock()
        self.progress: BatchProgress | None = None   # a batch run (--until-end)
        # Filters tune their calibration windows here, off the model callbacks (~0.3-1 s each).
        self.filter_tuner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="filter-tuner")
        self.reloads = 0
        self.reload_errors = 0
        self.camera_restarts = 0

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Check everything (prepare), bind the control socket, open the sinks, then start every
        camera; raises ConfigError (or ControlError: another daemon serves the endpoint) before
        any camera runs."""
        deployment = prepare(self.cfg, self.models)
        self.control = ControlServer(self.cfg.stats.endpoint, {
            "stats": lambda _r: self.stats.snapshot(),
            "health": lambda _r: self.health(),
            "config": lambda _r: redact_sources(self.cfg.to_dict()),
        }, max_request_bytes=self.cfg.stats.max_request_bytes)
        self.stats.sections["daemon"] = self._daemon_section
        self.stats.sections["models"] = self.models.stats
        self.stats.sections["memory"] = self.models.memory_stats
        self.stats.sections["device"] = self.models.device_stats
        self.stats.sections["offload"] = self._offload_section
        self.stats.sections["results"] = self.hub.stats
        self._open_sinks()
        self.control.start()
        if self.cfg.stats.prometheus:
            from edgeva.prometheus import PrometheusServer

            try:
                self.prometheus = PrometheusServer(self.cfg.stats.prometheus, self.stats.snapshot)
            except OSError as exc:
                raise ConfigError("stats.prometheus", f"cannot listen on {self.cfg.stats.prometheus}: {exc}") from None
            self.prometheus.start()
        with self._lock:
            self._apply(deployment)
        status = f"{len(self.cameras)} cameras, {len(self.cfg.queries)} queries"
        self.notifier.ready(status)
        log.info("edgeva %s running: %s; control on %s", __version__, status, self.control.bound_endpoint)

    def serve(self, max_runtime_s: float | None = None, exit_when_sources_end: bool = False) -> int:
        """Run until stopped (signal, max_runtime_s, or every source ended when asked to)."""
        try:
            self._serve_loop(max_runtime_s, exit_when_sources_end)
        finally:
            self.shutdown()
        return 0

    def _serve_loop(self, max_runtime_s: float | None, exit_when_sources_end: bool) -> None:
        started = time.monotonic()
        next_log = started + self.cfg.stats.log_interval_s
        next_progress = started + self.PROGRESS_INTERVAL_S
        last_outcomes, last_outcome_at = -1, started
        if exit_when_sources_end:
            self.progress = BatchProgress()
            endless = [c.id for c in self.cfg.cameras
                       if c.enabled and (c.loop or classify_source(c.source) is not SourceKind.FILE)]
            if endless:
                log.warning("--until-end: cameras %s never end (a loop or a live source); stop with SIGTERM",
                            ", ".join(endless))
        next_check = started + self.RESTART_CHECK_S
        while not self._stop.wait(timeout=0.25):
            now = time.monotonic()
            if self._reload.is_set():
                self._reload.clear()
                self.reload()
            self.errors.observe(self.stats.queries)
            if self.notifier.watchdog_due(now) and self.health()["status"] == "ok":
                self.notifier.watchdog()      # a daemon that is not healthy gets restarted by systemd
            if now >= next_check:
                next_check = now + self.RESTART_CHECK_S
                self._restart_crashed_cameras()
            if now >= next_log:
                next_log = now + self.cfg.stats.log_interval_s
                log.info("stats %s", json.dumps(self._brief()))
            if self.progress is not None and now >= next_progress:
                next_progress = now + self.PROGRESS_INTERVAL_S
                log.info("progress: %s", self.progress.line(*self._batch_progress()))
            if max_runtime_s is not None and now - started >= max_runtime_s:
                break
            if exit_when_sources_end and self.cameras and all(c.finished() for c in self.cameras.values()):
                outcomes = sum(q.bucketed for q in list(self.stats.queries.values()))
                if outcomes != last_outcomes:
                    last_outcomes, last_outcome_at = outcomes, now
                stalled = now - last_outcome_at > self.UNTIL_END_STALL_S
                if self._drained() or stalled:
                    if stalled:   # a lost frame must not keep a batch run waiting for ever
                        log.error("every source ended, but frames have been in flight without any outcome "
                                  "for %.0f s; stopping", self.UNTIL_END_STALL_S)
                    log.info("every source ended")
                    if self.progress is not None:
                        log.info("progress: %s", self.progress.line(*self._batch_progress()))
                    break

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        self._reload.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.request_stop())
        signal.signal(signal.SIGINT, lambda *_: self.request_stop())
        signal.signal(signal.SIGHUP, lambda *_: self.request_reload())

    def shutdown(self) -> None:
        self.notifier.stopping()
        log.info("stopping %d cameras", len(self.cameras))
        with self._lock:
            pipelines = list(self.cameras.values())
            self.cameras.clear()
        self._stop_pipelines(pipelines)
        self._stop_tier_groups(set(self.tier_groups))   # their fallbacks submit to the local models
        self.models.stop()
        self.filter_tuner.shutdown(wait=False, cancel_futures=True)
        self.hub.close()
        if self.control is not None:
            self.control.stop()
        if self.prometheus is not None:
            self.prometheus.stop()
        errors = self.stats.accounting_errors(stopped=True)
        if errors:
            log.error("accounting inconsistent: %s", "; ".join(errors))
        log.info("final stats %s", json.dumps(self.stats.snapshot(), default=str))
        self.notifier.close()

    # ------------------------------------------------------------ reload
    def reload(self) -> bool:
        """Re-read the config file: prepare the new state (every check start-up makes), then apply
        it, restarting only cameras whose own config, queries, routes or models changed. A config
        that fails any check is rejected whole and the running one keeps running untouched."""
        if self.cfg.source_path is None:
            log.warning("SIGHUP ignored: the config did not come from a file")
            return False
        self.notifier.reloading()
        try:
            deployment = prepare(self._config_loader(self.cfg.source_path), self.models)
        except ConfigError as exc:
            self.reload_errors += 1
            log.error("reload rejected, keeping the running config: %s", exc)
            self.notifier.ready("reload rejected")
            return False
        try:
            with self._lock:
                changes = self._apply(deployment)
        except Exception:   # prepare() accepted it: this is a bug or the machine; keep serving
            self.reload_errors += 1
            log.exception("reload failed while applying it; cameras that did not start stay stopped")
            self.notifier.ready("reload failed")
            return False
        self.reloads += 1
        log.info("reloaded: added %s, removed %s, restarted %s", changes.added, changes.removed, changes.restarted)
        self.notifier.ready(f"reloaded: +{len(changes.added)} -{len(changes.removed)} ~{len(changes.restarted)}")
        return True

    def _apply(self, new: Deployment) -> CameraChanges:
        """Make the running state what `new` says (start-up applies onto nothing). Everything that
        can fail was checked by prepare()."""
        old = self._running_cfg
        changes = camera_changes(old, self.routes, new, self.models.replaced_by(new.pool))
        if old is not None and (old.sinks != new.cfg.sinks or old.stats != new.cfg.stats):
            log.warning("sinks and stats settings take effect at the next restart, not on reload")
        self._stop_pipelines([self.cameras.pop(cid) for cid in changes.removed + changes.restarted
                              if cid in self.cameras])
        for cid in changes.removed:
            self.stats.remove_camera(cid)
        new_ids = {q.id: q.camera for q in new.cfg.queries}
        for q in old.queries if old is not None else []:
            if new_ids.get(q.id) != q.camera:   # gone, or moved to another camera
                self.stats.remove_query(q.id)
        if changes.tiers_changed:
            self._stop_tier_groups(set(self.tier_groups))
        self.models.apply(new.pool)
        self.cfg, self.routes, self.splits, self._running_cfg = new.cfg, new.routes, new.splits, new.cfg
        by_id = {c.id: c for c in new.cfg.cameras}
        for cid in changes.restarted + changes.added:
            self._start_camera(by_id[cid], new.cfg.queries_for(cid))
        in_use = {r.tiers for r in new.routes.values() if not r.local}
        self._stop_tier_groups(set(self.tier_groups) - in_use)
        return changes

    def _stop_pipelines(self, pipelines: list[CameraPipeline]) -> None:
        """Stop cameras in parallel (a stalled stream takes seconds) and keep the watchdog fed."""
        stoppers = [threading.Thread(target=p.stop, name=f"stop-{p.camera_id}", daemon=True) for p in pipelines]
        for t in stoppers:
            t.start()
        deadline = time.monotonic() + 5.0
        for t in stoppers:
            while t.is_alive() and time.monotonic() < deadline:
                t.join(timeout=0.5)
                if self.notifier.watchdog_due():
                    self.notifier.watchdog()

    def _restart_crashed_cameras(self) -> None:
        """A reader that died of a bug is restarted; a source that fails reconnects by itself."""
        with self._lock:
            for cid, pipeline in list(self.cameras.items()):
                if pipeline.crashed():
                    log.error("camera %s: reader crashed; restarting the camera", cid)
                    pipeline.stop()
                    self.cameras.pop(cid)
                    self.camera_restarts += 1
                    self._start_camera(pipeline.cfg, self.cfg.queries_for(cid))

    # ------------------------------------------------------------ parts
    def _start_camera(self, cam: CameraConfig, queries: list[QueryConfig]) -> None:
        runtimes = [self._build_query(q, cam=cam) for q in queries]
        pipeline = CameraPipeline(cam, runtimes, self.stats)
        self.cameras[cam.id] = pipeline
        pipeline.start()

    def _build_query(self, q: QueryConfig, cam: CameraConfig) -> QueryRuntime:
        backpressure = cam.batch
        if q.task.type == "passthrough":
            return PassthroughQuery(q, self.stats, self.hub)
        from edgeva.filtering import QueryFilter, default_feature, run_inline
        from edgeva.models.tasks import build_task

        worker = self.models.port(model_key(q))
        task = build_task(q.task, worker.model, q.id)
        model = worker.model
        route = self.routes.get(q.id, Route())
        if not route.local:
            worker = self._offload_port(q, route, worker)
        query_filter = QueryFilter(q.filter, agreement=task.agreement,
                                   target=q.accuracy_target, preferred_feature=default_feature(q.task.type),
                                   # batch replay tunes inline: its results must not depend on this box's speed
                                   tune_runner=run_inline if backpressure else self.filter_tuner.submit,
                                   look_ahead=looks_ahead(q.filter, cam),
                                   ) if q.filter.enabled else None
        runtime = ModelQuery(q, self.stats, self.hub, worker, task, query_filter, backpressure)
        self._announce_weights(q, model)
        return runtime

    def _announce_weights(self, q: QueryConfig, model: Any) -> None:
        """`weights` in the query's stats; random weights also get a loud warning: their counts are noise."""
        weights = getattr(model, "weights", None)
        self.stats.set_gauges(q.id, weights=weights or RANDOM_WEIGHTS)
        if weights is None:
            log.warning("WARNING: query %s runs %s with RANDOM WEIGHTS (no weights file): its results are noise, "
                        "not detections. Run tools/setup.sh on a connected machine (it fetches real weights into "
                        "weights/) or give the query `weights:`.", q.id, q.model)

    def _offload_port(self, q: QueryConfig, route: Route, local: Any) -> Any:
        from edgeva.offload import TierGroup, drop_fallback, local_fallback

        group = self.tier_groups.get(route.tiers)
        if group is None:
            tiers = {t.name: t for t in self.cfg.tiers}
            group = self.tier_groups[route.tiers] = TierGroup([tiers[name] for name in route.tiers]).start()
        fallback = local_fallback(local) if self.cfg.placement.fallback == "local" else drop_fallback
        split = self.splits.get(q.id)
        split_model, split_at = (split.model, split.index) if split is not None else (None, None)
        if split_model is not None:      # the head runs inside the local executor (the memory manager's run)
            split_model = split_model.running_in(local.call)
        log.info("query %s: %s", q.id, route.describe())
        return group.port(model_key(q), fallback, model=local.model, split_at=split_at,
                          split_model=split_model)

    def _stop_tier_groups(self, keys: set[tuple[str, ...]]) -> None:
        for key in keys:
            group = self.tier_groups.pop(key, None)
            if group is not None:
                group.stop()

    def _offload_section(self) -> dict[str, Any]:
        return {",".join(k): g.snapshot() for k, g in list(self.tier_groups.items())}

    def _open_sinks(self) -> None:
        from edgeva.sinks import SQLiteSink, ZmqPubSink

        import sqlite3

        import zmq

        sinks = self.cfg.sinks
        if sinks.sqlite:
            retention_s = None if sinks.retention_days is None else sinks.retention_days * 86400.0
            try:
                self.hub.add_sink(SQLiteSink(sinks.sqlite, batch=sinks.batch, flush_s=sinks.flush_s,
                                             retention_s=retention_s))
            except (OSError, sqlite3.Error) as exc:
                raise ConfigError("sinks.sqlite", f"cannot open {sinks.sqlite}: {exc}") from None
        if sinks.zmq_pub:
            try:
                self.hub.add_sink(ZmqPubSink(sinks.zmq_pub))
            except zmq.ZMQError as exc:
                raise ConfigError("sinks.zmq_pub", f"cannot bind {sinks.zmq_pub}: {exc}") from None

    # ------------------------------------------------------------ views
    def _batch_progress(self) -> tuple[int, int | None, tuple[int, int] | None]:
        """Frames done and to do over every camera, and the clip a single folder camera is on."""
        parts = [p.progress() for p in list(self.cameras.values())]
        done = sum(p[0] for p in parts)
        total = None if any(p[1] is None for p in parts) else sum(p[1] for p in parts if p[1] is not None)
        clips = (parts[0][2], parts[0][3]) if len(parts) == 1 else None
        return done, total, clips

    def summary(self) -> str:
        """What a batch run did, for after serve(): frames, rate, per-query buckets, lost results."""
        snap = self.stats.snapshot()
        frames = sum(c["frames_delivered"] for c in snap["cameras"].values())
        text = (self.progress or BatchProgress()).summary(snap, frames)
        errors = self.stats.accounting_errors(stopped=True)
        return text + ("\naccounting errors: " + "; ".join(errors) if errors else "")

    def _drained(self) -> bool:
        """No frame is still on its way through a query (so stopping now drops nothing)."""
        return all(q.in_flight == 0 for q in list(self.stats.queries.values()))

    def _threads_ok(self) -> bool:
        control_ok = self.control is not None and self.control.alive()
        return control_ok and self.models.alive() and all(p.alive() for p in list(self.cameras.values()))

    def _not_running(self) -> list[str]:
        """Configured cameras and queries that do not run (a camera that never started, a query
        its camera's pipeline does not hold)."""
        cfg = self._running_cfg or self.cfg
        pipelines = dict(self.cameras)
        problems = []
        for cam in cfg.cameras:
            if not cam.enabled:
                continue
            pipeline = pipelines.get(cam.id)
            if pipeline is None:
                problems.append(f"camera {cam.id} is not running")
                continue
            running = set(pipeline.query_ids())
            problems += [f"query {q.id} is not running" for q in cfg.queries_for(cam.id) if q.id not in running]
        return problems

    def health(self) -> dict[str, Any]:
        """ok only when every configured camera streams and every query runs, no query drops
        nearly every frame with `error`, no sink is losing results and every thread is alive."""
        cams = {cid: self.stats.cameras[cid].state for cid in list(self.cameras) if cid in self.stats.cameras}
        problems = self._not_running()
        problems += [f"camera {cid} is {state}" for cid, state in cams.items() if state != "streaming"]
        problems += [f"query {q} drops nearly every frame with error" for q in self.errors.failing()]
        losing = self.hub.losing()
        if losing:
            problems.append("a sink is losing results")
        threads_ok = self._threads_ok()
        if not threads_ok:
            problems.append("a thread died")
        return {"status": "degraded" if problems else "ok", "version": __version__, "cameras": cams,
                "problems": problems, "threads_ok": threads_ok,
                "accounting_errors": self.stats.accounting_errors(),
                "results_lost": self.hub.lost(), "losing_results": losing}

    def _daemon_section(self) -> dict[str, Any]:
        return {"version": __version__, "config": self.cfg.source_path, "reloads": self.reloads,
                "reload_errors": self.reload_errors, "camera_restarts": self.camera_restarts, "sink_errors": self.hub.sink_errors,
                "control_requests": self.control.requests_served if self.control else 0,
                "control_rejected": self.control.requests_rejected if self.control else 0}

    def _brief(self) -> dict[str, Any]:
        snap = self.stats.snapshot()
        return {q: {k: v[k] for k in ("frames_in", "inferred", "reused", "offloaded", "dropped_total")}
                for q, v in snap["queries"].items()}
