"""Memory manager invariants: budget, sharing counted once, refusal of oversized models,
Belady victims, pipelined execution equal to a plain forward, overlap with simulated transfer."""
from __future__ import annotations

import random

import pytest
import torch
import torchvision
from torch import nn

from edgeva.memory import (BudgetExceededError, EvictionPolicy, Granularity, MemoryEvent, MemoryManager,
                           ModelTooLargeError, unique_bytes)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def linear_model(features: int) -> nn.Module:
    """A model of exactly features*features*4 bytes (no bias)."""
    return nn.Sequential(nn.Linear(features, features, bias=False)).eval()


def small_convnet(seed: int, channels: int = 8, shared: nn.Module | None = None) -> nn.Module:
    torch.manual_seed(seed)
    stem = shared if shared is not None else nn.Conv2d(3, channels, 3, padding=1)
    return nn.Sequential(stem, nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 4)).eval()


def checked_manager(budget: int, **kwargs) -> tuple[MemoryManager, list[MemoryEvent]]:
    events: list[MemoryEvent] = []

    def check(event: MemoryEvent) -> None:
        assert event.resident_bytes <= budget, event
        events.append(event)

    return MemoryManager(budget, listeners=[check], **kwargs), events


def test_shared_tensors_are_counted_once():
    shared_stem = nn.Conv2d(3, 64, 3)
    a = small_convnet(0, 64, shared_stem)
    b = small_convnet(1, 64, shared_stem)
    expected = unique_bytes([a, b])
    assert expected < unique_bytes([a]) + unique_bytes([b])
    mm = MemoryManager(10 * expected, simulate_transfer=False)
    mm.register("a", a)
    mm.register("b", b)
    assert mm.total_registered_bytes() == expected
    x = torch.randn(1, 3, 8, 8)
    with torch.inference_mode():
        mm.run("a", lambda: a(x))
        assert mm.missing_bytes("b") == unique_bytes([b]) - unique_bytes([shared_stem])
        _, timing = mm.run("b", lambda: b(x))
    assert timing.bytes_loaded == unique_bytes([b]) - unique_bytes([shared_stem])
    assert mm.resident_bytes == expected
    mm.close()


def test_model_larger_than_budget_is_refused_with_sizes():
    mm = MemoryManager(1 << 20)
    with pytest.raises(ModelTooLargeError) as err:
        mm.register("big-detector", linear_model(1024))        # 4 MiB
    message = str(err.value)
    assert "big-detector" in message and "4.0 MiB" in message and "1.0 MiB" in message


def test_belady_evicts_the_model_needed_last_where_lru_would_not():
    size = 256 * 256 * 4
    models = {k: linear_model(256) for k in "ABC"}
    x = torch.randn(1, 256)
    for policy, expected_victim in ((EvictionPolicy.BELADY, "B"), (EvictionPolicy.LRU, "A")):
        mm = MemoryManager(2 * size, simulate_transfer=False, eviction=policy)
        for k, m in models.items():
            mm.register(k, m)
        with torch.inference_mode():
            mm.run("A", lambda: models["A"](x))
            mm.run("B", lambda: models["B"](x))
            mm.set_upcoming(["C", "A", "B"])        # C now, then A again, B last
            victims = mm.choose_victims(size, "C")
            assert {min(v.models()) for v in victims} == {expected_victim}, policy
            mm.run("C", lambda: models["C"](x))
        assert mm.is_resident("C") and not mm.is_resident(expected_victim)
        mm.close()


def test_belady_keeps_a_models_first_layers_for_pipelining():
    """Within a model needed next, its later blocks go first: they load while early ones run."""
    a = nn.Sequential(*[nn.Linear(128, 128, bias=False) for _ in range(4)]).eval()
    b = linear_model(128)
    layer = 128 * 128 * 4
    mm = MemoryManager(4 * layer, simulate_transfer=False)
    mm.register("a", a)
    mm.register("b", b)
    with torch.inference_mode():
        mm.run("a", lambda: a(torch.randn(1, 128)))
        mm.set_upcoming(["b", "a"])
        victims = mm.choose_victims(layer, "b")
    assert [(v.models(), max(i for _, i in v.users)) for v in victims] == [({"a"}, 3)]
    mm.close()


@pytest.mark.parametrize("granularity,eviction", [(Granularity.BLOCK, EvictionPolicy.BELADY),
                                                  (Granularity.BLOCK, EvictionPolicy.LRU),
                                                  (Granularity.MODEL, EvictionPolicy.LRU),
                                                  (Granularity.MODEL, EvictionPolicy.BELADY)])
def test_budget_is_never_exceeded_under_a_random_workload(granularity, eviction):
    rng = random.Random(7)
    shared = nn.Conv2d(3, 16, 3, padding=1)
    models = {f"m{i}": small_convnet(i, 16, shared if i % 2 else None) for i in range(6)}
    largest = max(unique_bytes([m]) for m in models.values())
    budget = largest + unique_bytes(models.values()) // 3
    mm, events = checked_manager(budget, bandwidth_bytes_per_s=5e9, granularity=granularity,
                                 eviction=eviction, group_min_bytes=1024)
    for k, m in models.items():
        mm.register(k, m)
    x = torch.randn(2, 3, 8, 8)
    keys = list(models)
    with torch.inference_mode():
        for _ in range(60):
            key = rng.choice(keys)
            mm.set_upcoming(rng.sample(keys, rng.randint(0, len(keys))))
            out, _ = mm.run(key, lambda: models[key](x))
            assert mm.is_resident(key)
            assert mm.resident_bytes <= budget
            assert mm.resident_bytes == sum(s.nbytes for s in {id(s): s for l in map(mm.layout, keys)
                                                                for s in l.slots}.values()
                                            if s.state.name != "HOST")
    assert {e.kind for e in events} >= {"load", "evict", "run"}
    assert mm.stats()["peak_resident_bytes"] <= budget
    mm.close()


def test_the_invariant_check_fires_if_accounting_goes_over():
    mm = MemoryManager(100)
    mm.resident_bytes = 101
    with pytest.raises(BudgetExceededError):
        mm._check_budget()


def test_pipelined_execution_equals_plain_forward_and_hides_load_time():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    other = linear_model(64)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        reference = model(x)
    size = unique_bytes([model])
    mm = MemoryManager(size + 1, bandwidth_bytes_per_s=3e9, group_min_bytes=256 << 10)
    mm.register("resnet18", model)
    mm.register("other", other)
    timings = []
    with torch.inference_mode():
        for _ in range(5):   # several pipelined runs: one may be all stall on a busy box
            mm.run("other", lambda: other(torch.randn(1, 64)))     # evicts part of resnet18
            assert not mm.is_resident("resnet18")
            out, timing = mm.run("resnet18", lambda: model(x))
            assert torch.equal(out, reference)
            timings.append(timing)
    first, *pipelined = timings
    assert first.hidden_s == 0.0 and first.stall_s > 0      # learning run: load, then run
    assert mm.layout("resnet18").learned
    assert all(t.bytes_loaded > 0 and t.load_s > 0 for t in pipelined)
    assert max(t.hidden_s for t in pipelined) > 0
    stats = mm.stats()
    assert stats["overlap"] > 0 and stats["hidden_load_s"] > 0
    assert not any(k.startswith("nvml_") or k.startswith("cuda_") for k in stats)
    mm.close()


def test_learned_order_follows_execution_not_registration():
    class Backwards(nn.Module):
        def __init__(self):
            super().__init__()
            self.late = nn.Linear(8, 8)
            self.early = nn.Linear(8, 8)

        def forward(self, x):
            return self.late(self.early(x))

    model = Backwards().eval()
    mm = MemoryManager(1 << 20, simulate_transfer=False)
    layout = mm.register("m", model)
    with torch.inference_mode():
        mm.run("m", lambda: model(torch.randn(1, 8)))
    assert [layout.blocks[i].module_name for i in layout.load_order] == ["early", "late"]
    mm.close()


@cuda
@pytest.mark.cuda
def test_cuda_pipelined_swap_matches_and_stays_in_budget():
    device = torch.device("cuda:0")
    torch.manual_seed(0)
    a = torchvision.models.resnet18(num_classes=10).eval().to(device)
    b = torchvision.models.resnet18(num_classes=10).eval().to(device)
    x = torch.randn(2, 3, 64, 64, device=device)
    with torch.inference_mode():
        ref_a, ref_b = a(x), b(x)
    budget = unique_bytes([a]) + unique_bytes([b]) // 2
    mm = MemoryManager(budget, device)
    mm.register("a", a)
    mm.register("b", b)
    with torch.inference_mode():
        for _ in range(3):
            out_a, _ = mm.run("a", lambda: a(x))
            out_b, timing = mm.run("b", lambda: b(x))
            assert torch.equal(out_a, ref_a) and torch.equal(out_b, ref_b)
            assert mm.resident_bytes <= budget
    assert timing.bytes_loaded > 0 and timing.load_s > 0
    stats = mm.stats()
    assert stats["cuda_allocated_bytes"] > 0
    mm.close()


def test_a_failed_load_is_released_and_the_next_run_loads_again():
    model = linear_model(64)
    mm = MemoryManager(unique_bytes([model]) * 2, bandwidth_bytes_per_s=1e9)
    mm.register("m", model)
    original = mm._load
    calls = {"n": 0}

    def fail_once(job):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("copy failed")
        return original(job)

    mm._load = fail_once
    with torch.inference_mode():
        with pytest.raises(Exception):
            mm.run("m", lambda: model(torch.randn(1, 64)))
        assert mm.resident_bytes == 0                      # nothing half-loaded still counts
        out, timing = mm.run("m", lambda: model(torch.randn(1, 64)))
    assert out.shape == (1, 64) and timing.bytes_loaded > 0
    assert mm.is_resident("m")
    mm.close()
