"""The daemon routes queries to other tiers: real worker processes on loopback, a kill mid-stream,
the plan file as the source of routes."""
from __future__ import annotations

import signal
import time

import pytest
import torch
import yaml

from edgeva.config import ConfigError, load_config, parse_config
from edgeva.daemon import Daemon
from edgeva.models import build_model
from edgeva.router import Route, plan_routes
from edgeva.sinks import read_results
from edgeva.systemd import Notifier
from tests.conftest import wait_until, write_test_clip
from tests.test_offload import WorkerProcess




@pytest.mark.slow
def test_offload_failover_and_local_fallback_account_for_every_frame(tmp_path):
    torch.manual_seed(3)
    weights = tmp_path / "mnv3.pt"
    torch.save(build_model("mobilenet_v3_small").module.state_dict(), weights)
    workers = {n: WorkerProcess(tmp_path, n, "--models", "mobilenet_v3_small") for n in ("a", "b")}
    daemon = None
    try:
        endpoints = {n: w.wait_ready() for n, w in workers.items()}
        clip = write_test_clip(tmp_path / "c.mp4", frames=40, fps=20, size=(96, 96))
        cfg_path = tmp_path / "edgeva.yaml"
        cfg_path.write_text(yaml.safe_dump({
            "cameras": [{"id": "c", "source": str(clip), "loop": True}],
            "queries": [{"id": "scene", "camera": "c", "model": "mobilenet_v3_small", "weights": str(weights),
                         "task": {"type": "classify"}, "filter": {"enabled": False},
                         "sla": {"fps": 10, "latency_ms": 3000}, "placement": ["a", "b"]}],
            "tiers": [{"name": n, "endpoint": e, "timeout_ms": 1500, "heartbeat_ms": 200, "credit": 4}
                      for n, e in endpoints.items()],
            "placement": {"fallback": "local"},
            "sinks": {"sqlite": str(tmp_path / "r.db"), "flush_s": 0.1},
            "stats": {"endpoint": f"ipc://{tmp_path}/ctl.sock"}}))
        daemon = Daemon(load_config(cfg_path), notifier=Notifier({}))
        daemon.start()
        q = lambda: daemon.stats.snapshot()["queries"]["scene"]  # noqa: E731
        wait_until(lambda: q()["offloaded"] >= 10, 60, "offloaded frames")
        workers["a"].proc.send_signal(signal.SIGKILL)          # one tier dies mid-stream
        before = q()["offloaded"]
        wait_until(lambda: q()["offloaded"] >= before + 10, 60, "traffic moving to the other tier")
        workers["b"].proc.send_signal(signal.SIGKILL)          # then the other: frames run here
        local_before = q()["inferred"]
        wait_until(lambda: q()["inferred"] >= local_before + 5, 60, "local fallback")
        offload = daemon.stats.snapshot()["offload"]["a,b"]
        daemon.request_stop()
        daemon.serve()
        s = daemon.stats.snapshot()["queries"]["scene"]
        assert s["in_flight"] == 0
        assert s["frames_in"] == s["inferred"] + s["reused"] + s["offloaded"] + s["dropped_total"]
        rows = list(read_results(tmp_path / "r.db", "scene", limit=100_000))
        tiers = {r["outcome"] for r in rows}
        assert {"offloaded", "inferred"} <= tiers
        assert offload  # the group's snapshot reaches the stats
    finally:
        if daemon is not None:
            daemon.request_stop()
        for w in workers.values():
            w.stop()


def _plan_config(tmp_path, plan_file=None, node=None, **query):
    raw = {"cameras": [{"id": "c", "source": "rtsp://127.0.0.1/x"}],
           "queries": [{"id": "cars-gate", "camera": "c", "model": "yolov8n",
                        "task": {"type": "count", "classes": ["car"]}, **query}],
           "tiers": [{"name": "regional", "endpoint": "tcp://127.0.0.1:7000"},
                     {"name": "edge1", "endpoint": "tcp://127.0.0.1:7001"}],
           "placement": {"plan": plan_file or "local", **({"node": node} if node else {})}}
    return parse_config(raw)


def test_routes_follow_the_plan_file_and_query_overrides(tmp_path):
    from edgeva.placement import load_hierarchy, solve

    plan = solve(load_hierarchy("configs/hierarchy.yaml"))
    plan_file = tmp_path / "plan.yaml"
    plan.save(plan_file)
    planned = next(a for a in plan.assignments if a.query == "cars-gate")
    routes = plan_routes(_plan_config(tmp_path, str(plan_file)))
    assert routes["cars-gate"] == Route((planned.tail_node,), None, "plan")
    # The box runs this node itself: the plan keeps the query here.
    assert plan_routes(_plan_config(tmp_path, str(plan_file), node=planned.tail_node))["cars-gate"].local
    assert plan_routes(_plan_config(tmp_path, str(plan_file), placement="local"))["cars-gate"].local
    assert plan_routes(_plan_config(tmp_path, placement=["edge1", "regional"], split_at=3))["cars-gate"] == \
        Route(("edge1", "regional"), 3, "query placement")


def test_plan_naming_an_unconfigured_tier_is_a_config_error(tmp_path):
    from edgeva.placement import load_hierarchy, solve

    plan = solve(load_hierarchy("configs/hierarchy.yaml"))
    plan_file = tmp_path / "plan.yaml"
    plan.save(plan_file)
    cfg = _plan_config(tmp_path, str(plan_file))
    cfg.tiers = []
    with pytest.raises(ConfigError) as err:
        plan_routes(cfg)
    assert err.value.path == "placement.plan" and "no tier of that name" in err.value.reason


def test_a_planned_resnet50_split_runs_where_the_plan_cuts(tmp_path):
    """The planner cuts resnet50 after layer3.5 (0.8 MB of activations); the daemon used to read
    the plan's split index as a count of top-level children and cut after `relu` (3.2 MB)."""
    from edgeva.placement import parse_hierarchy, solve

    profiles = yaml.safe_load(open("configs/hierarchy.yaml"))["models"]
    resnet50 = next(m for m in profiles if m["name"] == "resnet50")
    # A camera box that holds the head up to layer3 (34 MB) but not layer4 (94 MB), in front of a
    # slower shared box: the fastest feasible plan is the cut after layer3.5.
    hierarchy = parse_hierarchy({
        "nodes": [{"id": "cam", "memory_mb": 60, "speed": 1.0}, {"id": "edge", "memory_mb": 8000, "speed": 0.5}],
        "links": [{"child": "cam", "parent": "edge", "bandwidth_mbps": 100, "rtt_ms": 1}],
        "models": [resnet50],
        "queries": [{"id": "plates", "source": "cam", "model": "resnet50", "fps": 2, "frame_bytes": 3_000_000}]})
    plan = solve(hierarchy)
    planned = plan.assignments[0]
    assert (planned.head_node, planned.tail_node, planned.split_name) == ("cam", "edge", "layer3.5")
    planned_bytes = hierarchy.models["resnet50"].split_points[planned.split].activation_bytes
    plan.save(tmp_path / "plan.yaml")

    worker = WorkerProcess(tmp_path, "edge", "--models", "resnet50")
    daemon = None
    try:
        endpoint = worker.wait_ready()
        clip = write_test_clip(tmp_path / "c.mp4", frames=6, fps=10, size=(96, 96))
        cfg_path = tmp_path / "edgeva.yaml"
        cfg_path.write_text(yaml.safe_dump({
            "cameras": [{"id": "c", "source": str(clip), "replay": "fast"}],
            "queries": [{"id": "plates", "camera": "c", "model": "resnet50", "task": {"type": "classify"},
                         "filter": {"enabled": False}, "sla": {"latency_ms": 60000}}],
            "tiers": [{"name": "edge", "endpoint": endpoint, "timeout_ms": 30000, "credit": 2}],
            "placement": {"plan": str(tmp_path / "plan.yaml"), "node": "cam", "fallback": "drop"},
            "stats": {"endpoint": f"ipc://{tmp_path}/ctl.sock"}}))
        daemon = Daemon(load_config(cfg_path), notifier=Notifier({}))
        daemon.start()
        wait_until(lambda: daemon.stats.snapshot()["queries"]["plates"]["offloaded"] == 6, 120, "six split frames")
        tier = daemon.stats.snapshot()["offload"]["edge"]["tiers"]["edge"]
        assert tier["sent"] == 6 and tier["payload_bytes"] == 6 * planned_bytes == 6 * 802816
    finally:
        if daemon is not None:
            daemon.request_stop()
        worker.stop()
