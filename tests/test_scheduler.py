"""SwapScheduler: exactly one callback per item, deadline drops, refusal of oversized models,
budget kept under a random multi-model workload, swap-aware choice of the next model."""
from __future__ import annotations

import random
import threading
import time
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from edgeva.work import WorkItem
from edgeva.memory import MemoryEvent, ModelTooLargeError, unique_bytes
from edgeva.messages import DropReason, Frame
from edgeva.models.base import ZooModel
from edgeva.scheduler import ExecutionOrder, SwapOptions, SwapScheduler


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TinyModel(ZooModel):
    kind = "classifier"
    is_torch = True
    weights = None

    def __init__(self, name: str, module: nn.Module):
        super().__init__(torch.device("cpu"))
        self.name, self.class_names, self.input_size = name, ["a", "b"], 8
        self._module = module.eval()

    @property
    def module(self) -> nn.Module:
        return self._module

    def _predict(self, images: list[np.ndarray]) -> list[Any]:
        x = torch.from_numpy(np.stack(images)).float().permute(0, 3, 1, 2)
        return list(self._module(x))


def convnet(seed: int, channels: int = 32, stem: nn.Module | None = None,
            middle: nn.Module | None = None) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(stem or nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(),
                         middle or nn.Conv2d(channels, channels, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(),
                         nn.Linear(channels, 2))


class Recorder:
    """A WorkOwner that records every callback per item."""

    def __init__(self, query_id: str = "q"):
        self.query_id = query_id
        self.calls: Counter = Counter()
        self.outcomes: dict[int, str] = {}
        self.lock = threading.Lock()

    def complete(self, item: WorkItem, output: Any, finished_mono: float) -> None:
        with self.lock:
            self.calls[id(item)] += 1
            self.outcomes[id(item)] = "complete"

    def dropped(self, item: WorkItem, reason: DropReason) -> None:
        with self.lock:
            self.calls[id(item)] += 1
            self.outcomes[id(item)] = reason.value


def item(owner: Recorder, deadline_in_s: float, seq: int = 0) -> WorkItem:
    now = time.monotonic()
    image = np.zeros((8, 8, 3), np.uint8)
    return WorkItem(owner, Frame("cam", seq, time.time(), now, image), now + deadline_in_s)


def test_every_item_gets_exactly_one_callback_and_the_budget_holds():
    rng = random.Random(3)
    shared = nn.Conv2d(3, 32, 3, padding=1)
    models = {f"m{i}": TinyModel(f"m{i}", convnet(i, stem=shared if i < 2 else None)) for i in range(4)}
    modules = [m.module for m in models.values()]
    budget = max(unique_bytes([m]) for m in modules) + unique_bytes(modules) // 4
    over: list[MemoryEvent] = []
    scheduler = SwapScheduler(models, budget, options=SwapOptions(bandwidth_bytes_per_s=2e8, capacity=16),
                              listeners=[lambda e: e.resident_bytes > budget and over.append(e)])
    scheduler.start()
    owners = {k: Recorder(f"query-{k}") for k in models}
    submitted: list[tuple[Recorder, WorkItem]] = []
    rejected = 0

    def produce(keys: list[str], n: int, seed: int) -> None:
        nonlocal rejected
        local = random.Random(seed)
        for seq in range(n):
            key = local.choice(keys)
            it = item(owners[key], local.choice([-0.01, 0.002, 0.05, 0.3, 2.0]), seq)
            if scheduler.port(key).submit(it):
                submitted.append((owners[key], it))
            else:
                rejected += 1
            time.sleep(local.random() * 0.004)

    producers = [threading.Thread(target=produce, args=(list(models), 150, s)) for s in range(3)]
    for p in producers:
        p.start()
    for p in producers:
        p.join()
    time.sleep(rng.random() * 0.2)
    scheduler.stop()
    assert not over
    outcomes = Counter()
    for owner, it in submitted:
        assert owner.calls[id(it)] == 1
        outcomes[owner.outcomes[id(it)]] += 1
    assert sum(sum(o.calls.values()) for o in owners.values()) == len(submitted)
    assert outcomes["complete"] > 0 and outcomes["deadline"] > 0
    stats = scheduler.stats()
    assert stats["memory"]["peak_resident_bytes"] <= budget
    per_model = stats["models"]
    assert sum(m["submitted"] for m in per_model.values()) == len(submitted)
    assert sum(m["within_sla"] + m["late"] + sum(m["dropped"].values())
               for m in per_model.values()) == len(submitted)
    assert set(stats["queries"]) == {f"query-{k}" for k in models}
    assert not scheduler.port("m0").submit(item(owners["m0"], 1.0))     # stopped: refused


def test_a_frame_already_run_is_not_run_or_loaded_again():
    models = {"a": TinyModel("a", convnet(0))}
    runs: list[int] = []
    predict = models["a"]._predict
    models["a"]._predict = lambda images: runs.append(len(images)) or predict(images)
    scheduler = SwapScheduler(models, unique_bytes([models["a"].module]), options=SwapOptions(simulate_transfer=False))
    scheduler.start()
    first, later = Recorder("first"), Recorder("later")
    kept = item(first, 30.0, seq=5)
    try:
        assert scheduler.port("a").submit(kept)
        deadline = time.monotonic() + 10
        while first.calls[id(kept)] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        again = WorkItem(later, kept.frame, time.monotonic() + 30.0)      # another query keeps the frame later
        assert scheduler.port("a").submit(again)
        while later.calls[id(again)] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        scheduler.stop()
    assert first.outcomes[id(kept)] == later.outcomes[id(again)] == "complete"
    assert runs == [1]
    stats = scheduler.model_stats("a")
    assert stats["frames"] == 1 and stats["batches"] == 1 and stats["within_sla"] == 2
    assert stats["outputs_reused"] == 1


def test_expired_items_are_dropped_with_deadline_and_leftovers_with_shutdown():
    models = {"a": TinyModel("a", convnet(0))}
    scheduler = SwapScheduler(models, unique_bytes([models["a"].module]), options=SwapOptions(simulate_transfer=False))
    owner = Recorder()
    expired = item(owner, -0.5)
    assert scheduler.port("a").submit(expired)
    scheduler.start()
    deadline = time.monotonic() + 5
    while owner.calls[id(expired)] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert owner.outcomes[id(expired)] == DropReason.DEADLINE.value
    scheduler.stop()

    stopped = SwapScheduler(models, unique_bytes([models["a"].module]), options=SwapOptions(simulate_transfer=False))
    queued = item(owner, 10.0)
    assert stopped.port("a").submit(queued)
    stopped.stop()                                # never started: everything queued is a leftover
    assert owner.outcomes[id(queued)] == DropReason.SHUTDOWN.value and owner.calls[id(queued)] == 1


def test_model_larger_than_the_budget_is_refused_at_start_up():
    models = {"small": TinyModel("small", convnet(0, 4)), "huge": TinyModel("huge", convnet(1, 256))}
    with pytest.raises(ModelTooLargeError, match="'huge' needs .* MiB .* budget is .* MiB"):
        SwapScheduler(models, unique_bytes([models["small"].module]) * 2)


def test_port_offers_the_model_worker_surface():
    models = {"a": TinyModel("a", convnet(0))}
    scheduler = SwapScheduler(models, 1 << 24)
    port = scheduler.port("a")
    assert port.key == "a" and port.model is models["a"] and callable(port.submit)
    scheduler.start()
    owner = Recorder()
    it = item(owner, 5.0)
    assert port.submit(it)
    deadline = time.monotonic() + 5
    while not owner.calls[id(it)] and time.monotonic() < deadline:
        time.sleep(0.01)
    scheduler.stop()
    assert owner.outcomes[id(it)] == "complete"
    assert port.stats()["within_sla"] == 1


def test_swap_aware_order_prefers_the_model_sharing_resident_layers():
    middle = nn.Conv2d(128, 128, 3, padding=1)
    models = {"a": TinyModel("a", convnet(0, 128, middle=middle)),
              "b": TinyModel("b", convnet(1, 128, middle=middle)), "c": TinyModel("c", convnet(2, 128))}
    budget = int(max(unique_bytes([m.module]) for m in models.values()) * 1.2)
    for order, expected in ((ExecutionOrder.SWAP_AWARE, "b"), (ExecutionOrder.ROUND_ROBIN, "b")):
        scheduler = SwapScheduler(models, budget, options=SwapOptions(simulate_transfer=True, order=order,
                                                                     bandwidth_bytes_per_s=1e8))
        with torch.inference_mode():
            scheduler.memory.run("c", lambda: models["c"].module(torch.zeros(1, 3, 8, 8)))
            scheduler.memory.run("a", lambda: models["a"].module(torch.zeros(1, 3, 8, 8)))
        owner = Recorder()
        # c is listed first, so round-robin takes it; b shares a's stem and its load is smaller.
        scheduler._round_robin_next = 2
        for key in ("c", "b"):
            scheduler.port(key).submit(item(owner, 5.0))
        assert scheduler.memory.missing_bytes("b") < scheduler.memory.missing_bytes("c")
        plan = scheduler._choose(time.monotonic())
        chosen = plan.state.key
        assert chosen == ("b" if order is ExecutionOrder.SWAP_AWARE else "c")
        scheduler.stop()


def test_a_model_whose_load_exceeds_the_slack_is_still_probed():
    """Load time > deadline slack must not starve a model forever (it would never load)."""
    model = TinyModel("big", convnet(0, 256))
    size = unique_bytes([model.module])
    scheduler = SwapScheduler({"big": model}, size * 4,
                              options=SwapOptions(simulate_transfer=True, bandwidth_bytes_per_s=size / 0.5))
    owner = Recorder()
    items = []                                               # kept alive: the recorder keys by id()
    scheduler.start()
    try:
        for _ in range(40):
            items.append(item(owner, 0.2))                   # 200 ms slack, ~500 ms load
            scheduler.port("big").submit(items[-1])
            time.sleep(0.05)
        deadline = time.monotonic() + 10
        while len(owner.outcomes) < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        scheduler.stop()
    assert scheduler.memory.stats()["loads"] >= 1
    assert list(owner.outcomes.values()).count("complete") > 0


def test_a_model_returning_too_few_outputs_drops_the_rest_with_error():
    """The scheduler used to zip a batch with the outputs: a short output left frames with no
    callback at all (their query waited forever and the accounting never closed)."""
    class ShortModel(TinyModel):
        def _predict(self, images: list[np.ndarray]) -> list[Any]:
            return super()._predict(images)[:-1]

    models = {"a": ShortModel("a", convnet(0))}
    scheduler = SwapScheduler(models, unique_bytes([models["a"].module]),
                              options=SwapOptions(simulate_transfer=False, max_batch=4))
    owner = Recorder()
    items = [item(owner, 30.0, seq) for seq in range(4)]
    for it in items:
        assert scheduler.port("a").submit(it)
    scheduler.start()
    deadline = time.monotonic() + 10
    while sum(owner.calls.values()) < len(items) and time.monotonic() < deadline:
        time.sleep(0.01)
    scheduler.stop()
    assert all(owner.calls[id(it)] == 1 for it in items)
    outcomes = Counter(owner.outcomes[id(it)] for it in items)
    assert outcomes["complete"] == 3 and outcomes[DropReason.ERROR.value] == 1
    counts = scheduler.model_stats("a")
    assert counts["within_sla"] + counts["late"] == 3 and counts["dropped"] == {"error": 1}
