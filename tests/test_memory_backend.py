"""The memory policy through its transfer backends.

On the CPU the simulated backend makes real device copies that read as NaN until the compute
side waits on them and after they are evicted or released, so a missing wait, a use after
eviction or a close() that leaves modules on device copies shows up as wrong outputs or as
bytes still held. The `cuda` tests run the same checks with real copies on a GPU."""
from __future__ import annotations

import random

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from edgeva.memory import MemoryManager, OutsideRunError, unique_bytes
from edgeva.transfer import SimulatedBackend

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class UsesChildWeight(nn.Module):
    """The root's forward reads `proj`'s parameters itself: `proj`'s own hook never fires."""

    def __init__(self, features: int = 64):
        super().__init__()
        self.proj = nn.Linear(features, features)
        self.head = nn.Linear(features, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.linear(x, self.proj.weight, self.proj.bias))


def strict_manager(budget: int, **kwargs) -> MemoryManager:
    backend = SimulatedBackend(kwargs.pop("bandwidth_bytes_per_s", 50e9), copies=True)
    return MemoryManager(budget, backend=backend, **kwargs)


def convnet(seed: int, channels: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
                         nn.Conv2d(channels, channels, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(channels, 4)).eval()


def test_first_run_waits_for_every_block_not_only_those_whose_hook_fires():
    torch.manual_seed(0)
    model = UsesChildWeight().eval()
    other = nn.Linear(64, 64, bias=False).eval()
    x = torch.randn(2, 64)
    with torch.inference_mode():
        reference = model(x)
    mm = strict_manager(unique_bytes([model]) + 1, group_min_bytes=1)
    mm.register("m", model)
    mm.register("other", other)
    with torch.inference_mode():
        for _ in range(3):     # the learning run, then pipelined runs after an eviction
            out, _ = mm.run("m", lambda: model(x))
            assert torch.equal(out, reference)
            mm.run("other", lambda: other(x))
            assert not mm.is_resident("m")
    mm.close()


def test_close_gives_modules_back_as_host_tensors_and_frees_every_device_copy():
    model = convnet(1)
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        reference = model(x)
    mm = strict_manager(unique_bytes([model]))
    mm.register("m", model)
    with torch.inference_mode():
        mm.run("m", lambda: model(x))
    assert mm.backend.allocated_bytes() == unique_bytes([model])
    mm.close()
    assert mm.backend.allocated_bytes() == 0 and mm.resident_bytes == 0
    with torch.inference_mode():        # a plain worker can run it again (no hook, no device copy)
        assert torch.equal(model(x), reference)
    # ...and a new manager (a reload keeping the budget) can take it over.
    again = strict_manager(unique_bytes([model]))
    again.register("m", model)
    with torch.inference_mode():
        out, timing = again.run("m", lambda: model(x))
    assert torch.equal(out, reference) and timing.bytes_loaded == unique_bytes([model])
    again.close()


def test_a_registered_module_run_outside_the_managers_run_is_refused():
    model = convnet(2)
    mm = strict_manager(unique_bytes([model]))
    mm.register("m", model)
    with torch.inference_mode(), pytest.raises(OutsideRunError):
        model(torch.randn(1, 3, 8, 8))
    mm.close()


def test_a_workload_larger_than_the_budget_never_holds_more_than_the_budget_on_the_device():
    models = {f"m{i}": convnet(i, 32) for i in range(5)}
    x = torch.randn(2, 3, 12, 12)
    with torch.inference_mode():
        references = {k: m(x) for k, m in models.items()}
    total = unique_bytes(models.values())
    budget = max(unique_bytes([m]) for m in models.values()) * 2
    assert total > 2 * budget
    mm = strict_manager(budget, group_min_bytes=4096)
    for key, model in models.items():
        mm.register(key, model)
    assert mm.backend.allocated_bytes() == 0           # registering moves nothing to the device
    rng = random.Random(3)
    keys = list(models)
    with torch.inference_mode():
        for _ in range(25):
            key = rng.choice(keys)
            mm.set_upcoming(rng.sample(keys, 3))
            out, _ = mm.run(key, lambda: models[key](x))
            assert torch.equal(out, references[key])
            # The backend's bytes are the manager's resident bytes, exactly.
            assert mm.backend.allocated_bytes() == mm.resident_bytes <= budget
    assert mm.backend.peak_allocated <= budget
    assert mm.stats()["evictions"] > 0
    mm.close()


def test_shared_tensors_of_merged_models_move_once_and_stay_correct():
    shared = nn.Conv2d(3, 16, 3, padding=1)
    a, b = convnet(4), convnet(5)
    a[0] = b[0] = shared
    x = torch.randn(1, 3, 10, 10)
    with torch.inference_mode():
        ref_a, ref_b = a(x), b(x)
    mm = strict_manager(unique_bytes([a, b]))
    mm.register("a", a)
    mm.register("b", b)
    with torch.inference_mode():
        out_a, _ = mm.run("a", lambda: a(x))
        out_b, timing = mm.run("b", lambda: b(x))
    assert torch.equal(out_a, ref_a) and torch.equal(out_b, ref_b)
    assert timing.bytes_loaded == unique_bytes([b]) - unique_bytes([shared])
    assert mm.backend.allocated_bytes() == unique_bytes([a, b])
    mm.close()


# ---------------------------------------------------------------------------- on a GPU

def _warm_cuda_libraries(device: torch.device) -> None:
    """cuBLAS keeps a workspace per stream once used: allocate it before taking a baseline."""
    with torch.inference_mode():
        torchvision.models.resnet18(num_classes=10).eval().to(device)(torch.randn(2, 3, 64, 64, device=device))


def _cuda_allocated_after_frees(device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.empty(1, device=device)      # lets the allocator process blocks freed across streams
    return torch.cuda.memory_allocated(device)


@needs_cuda
@pytest.mark.cuda
def test_cuda_budget_accounting_matches_the_allocator():
    """Stated tolerance: the caching allocator rounds every block up to 512 bytes."""
    device = torch.device("cuda:0")
    models = {f"r{i}": torchvision.models.resnet18(num_classes=10).eval() for i in range(3)}
    x = torch.randn(2, 3, 64, 64, device=device)
    budget = unique_bytes([models["r0"]]) * 2
    _warm_cuda_libraries(device)
    baseline = _cuda_allocated_after_frees(device)
    mm = MemoryManager(budget, device)
    for key, model in models.items():
        mm.register(key, model)
    assert _cuda_allocated_after_frees(device) - baseline == 0      # nothing on the device yet
    with torch.inference_mode():
        for key in ["r0", "r1", "r2", "r0", "r2"]:
            out, _ = mm.run(key, lambda: models[key](x))
            del out
            used = _cuda_allocated_after_frees(device) - baseline
            resident_slots = sum(1 for s in mm._slots if s.device is not None)
            assert mm.resident_bytes <= used <= mm.resident_bytes + 512 * resident_slots
            assert mm.resident_bytes <= budget
    mm.close()
    assert _cuda_allocated_after_frees(device) - baseline == 0      # evicted and released blocks went back


@needs_cuda
@pytest.mark.cuda
def test_cuda_workload_larger_than_the_device_allows_starts_under_the_budget():
    """The allocator is capped below the workload's size: building on the device would fail."""
    device = torch.device("cuda:0")
    models = {f"r{i}": torchvision.models.resnet50(num_classes=100).eval() for i in range(4)}
    one = unique_bytes([models["r0"]])
    x = torch.randn(4, 3, 96, 96)
    with torch.inference_mode():
        references = {k: m(x) for k, m in models.items()}
    total_memory = torch.cuda.get_device_properties(device).total_memory
    _warm_cuda_libraries(device)
    baseline = _cuda_allocated_after_frees(device)
    cap = baseline + 2 * one + (256 << 20)                           # weights of two, plus activations
    assert 4 * one > cap - baseline
    torch.cuda.empty_cache()       # blocks cached by earlier tests would count against the cap
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total_memory), device)
    try:
        mm = MemoryManager(int(1.5 * one), device)
        for key, model in models.items():
            mm.register(key, model)
        with torch.inference_mode():
            for key in ["r0", "r1", "r2", "r3", "r1"]:
                out, _ = mm.run(key, lambda: models[key](x.to(device)))
                assert torch.allclose(out.cpu(), references[key], atol=1e-3, rtol=1e-3)
        mm.close()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


@needs_cuda
@pytest.mark.cuda
def test_cuda_close_restores_host_tensors_so_a_plain_worker_runs_after_a_reload():
    device = torch.device("cuda:0")
    model = UsesChildWeight(256).eval()
    x = torch.randn(3, 256)
    with torch.inference_mode():
        reference = model(x)
    mm = MemoryManager(unique_bytes([model]), device)
    mm.register("m", model)
    with torch.inference_mode():
        out, _ = mm.run("m", lambda: model(x.to(device)))      # first run: every block waited on
        assert torch.allclose(out.cpu(), reference, atol=1e-5)
    mm.close()
    assert all(p.device.type == "cpu" for p in model.parameters())
    model.to(device)
    with torch.inference_mode():
        assert torch.allclose(model(x.to(device)).cpu(), reference, atol=1e-5)
