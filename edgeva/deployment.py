"""Plan, then apply: everything a config asks for, built and checked before anything running changes.

`prepare(cfg, pool)` is the one validation start-up, reload and `edgeva check` share: the models
built, their weights loaded and run on a probe frame, each task fitting its model, a merged bundle
matching the config and the memory budget fitting (`ModelPool.plan`); every route resolved, its
tiers' key files readable and its split point found in the model it cuts; the SQLite sink's file
writable. It raises ConfigError naming the key and touches nothing that runs. `camera_changes`
then says, as a pure function of the old and new state, which cameras to add, remove or restart:
only those whose own config, queries, routes or models changed.
"""
from __future__ import annotations

import os
import sqlite3
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from edgeva.config import Config, ConfigError, SinksConfig, model_key
from edgeva.offload.keys import KeyFileError, load_public_key, load_secret_keypair
from edgeva.offload.split import SplitError, SplitModel
from edgeva.pool import ModelPool, PoolPlan
from edgeva.router import Route, plan_routes


@dataclass(frozen=True)
class SplitPlacement:
    model: SplitModel
    index: int            # the split point: layers [0, index) run here, the rest on the tier


@dataclass
class Deployment:
    """The complete, checked state a config asks for; applying it cannot fail."""

    cfg: Config
    pool: PoolPlan
    routes: dict[str, Route]
    splits: dict[str, SplitPlacement] = field(default_factory=dict)   # query id -> its cut


@dataclass(frozen=True)
class CameraChanges:
    added: list[str]
    removed: list[str]
    restarted: list[str]
    tiers_changed: bool


def prepare(cfg: Config, pool: ModelPool) -> Deployment:
    """Build and check everything `cfg` needs (see the module's doc); raises ConfigError."""
    pool_plan = pool.plan(cfg)
    routes = plan_routes(cfg)
    splits = _resolve_splits(cfg, routes, pool_plan)
    _check_tier_keys(cfg, routes)
    check_sinks(cfg.sinks)
    return Deployment(cfg, pool_plan, routes, splits)


def camera_changes(old_cfg: Optional[Config], old_routes: dict[str, Route], new: Deployment,
                   replaced_models: set[str]) -> CameraChanges:
    """Which cameras `new` adds, removes, and restarts (own config, queries or routes changed, a
    tier they offload to changed, or a model they use was replaced); the others keep running."""
    cfg = new.cfg
    old_by_id = {} if old_cfg is None else {c.id: c for c in old_cfg.cameras if c.enabled}
    new_by_id = {c.id: c for c in cfg.cameras if c.enabled}
    tiers_changed = old_cfg is not None and ([asdict(t) for t in old_cfg.tiers] != [asdict(t) for t in cfg.tiers]
                                             or old_cfg.placement != cfg.placement)

    def restart(cid: str) -> bool:
        assert old_cfg is not None
        queries = cfg.queries_for(cid)
        return (asdict(old_by_id[cid]) != asdict(new_by_id[cid])
                or [asdict(q) for q in old_cfg.queries_for(cid)] != [asdict(q) for q in queries]
                or any(old_routes.get(q.id) != new.routes.get(q.id) for q in queries)
                or (tiers_changed and any(not new.routes[q.id].local for q in queries))
                or any(model_key(q) in replaced_models for q in queries if q.task.type != "passthrough"))

    return CameraChanges(added=[cid for cid in new_by_id if cid not in old_by_id],
                         removed=[cid for cid in old_by_id if cid not in new_by_id],
                         restarted=[cid for cid in new_by_id if cid in old_by_id and restart(cid)],
                         tiers_changed=tiers_changed)


def check_sinks(sinks: SinksConfig) -> None:
    """The SQLite file can be opened for writing, or created (with its folders) where it should be."""
    if not sinks.sqlite:
        return
    path = Path(sinks.sqlite)
    if path.exists():
        if not path.is_file():
            raise ConfigError("sinks.sqlite", f"{path} is not a file")
        if not os.access(path, os.R_OK | os.W_OK):
            raise ConfigError("sinks.sqlite", f"{path} is not writable")
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
            try:
                conn.execute("PRAGMA schema_version").fetchone()
            finally:
                conn.close()
        except sqlite3.DatabaseError as exc:
            if "locked" not in str(exc):      # a running daemon writing it is fine
                raise ConfigError("sinks.sqlite", f"{path} is not an SQLite database: {exc}") from None
        return
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent                # the sink creates the missing folders
    try:
        fd, probe = tempfile.mkstemp(prefix=".edgeva-check-", dir=folder)
    except OSError as exc:
        raise ConfigError("sinks.sqlite", f"cannot create {path}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)


def _resolve_splits(cfg: Config, routes: dict[str, Route], pool: PoolPlan) -> dict[str, SplitPlacement]:
    splits: dict[str, SplitPlacement] = {}
    for i, q in enumerate(cfg.queries):
        route = routes.get(q.id)
        if route is None or route.local or not route.split_at:
            continue
        where = f"queries[{i}].split_at" if route.reason == "query placement" else _plan_key(cfg)
        model: Any = pool.models.get(model_key(q)) if q.task.type != "passthrough" else None
        if model is None:
            raise ConfigError(where, f"query {q.id!r} has no model to split")
        try:
            split_model = SplitModel(model)
            splits[q.id] = SplitPlacement(split_model, split_model.resolve(route.split_at))
        except SplitError as exc:
            raise ConfigError(where, f"query {q.id!r}: {exc}") from None
    return splits


def _plan_key(cfg: Config) -> str:
    return "placement.hierarchy" if cfg.placement.plan == "auto" else "placement.plan"


def _check_tier_keys(cfg: Config, routes: dict[str, Route]) -> None:
    used = {name for r in routes.values() for name in r.tiers}
    for i, tier in enumerate(cfg.tiers):
        if tier.name not in used:
            continue
        try:
            if tier.server_public_key:
                load_public_key(tier.server_public_key)
        except KeyFileError as exc:
            raise ConfigError(f"tiers[{i}].server_public_key", str(exc)) from None
        try:
            if tier.client_secret_key:
                load_secret_keypair(tier.client_secret_key)
        except KeyFileError as exc:
            raise ConfigError(f"tiers[{i}].client_secret_key", str(exc)) from None
