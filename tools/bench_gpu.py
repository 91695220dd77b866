#!/usr/bin/env python3
"""GPU benchmark: one table of what the device path does on this machine.

  throughput  YOLOv8n and ResNet50 end to end (uint8 frames in, outputs on the host) at batch
              1/8/32 in fp32 and fp16 (autocast), frames/s
  switch      two ResNet50s under a budget that holds one: time to switch (the run that loads
              the other model minus a resident run), and the copy time the device measured;
              for reference Clockwork loads a ResNet50 in 8.3 ms, PipeSwitch switches in 5.4-34.6 ms
  swap SLA    tools/bench_swap.py with real PCIe copies: frames within SLA per mode
  decode      frames/s decoding a clip with OpenCV (CPU) and with NVDEC (torchcodec/PyNvVideoCodec)
  residual    YOLOv8n with every convolution held as a base plus an int8 residual (`edgeva merge
              --residuals int8`), which rebuilds its dense weight on each run, against the plain
              model, fp16, batch 1 and 8: frames/s and the ratio

Without CUDA every device row says `skipped` and why; the CPU decode row is still measured.
Models are random-initialised (no weights are downloaded): speed does not depend on them.

  .venv/bin/python tools/bench_gpu.py --out out/gpu_bench.md
"""
from __future__ import annotations

import argparse
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgeva.decode import OPENCV, available_nvdec_readers, open_capture  # noqa: E402
from edgeva.memory import MemoryManager, unique_bytes  # noqa: E402
from edgeva.models import build_model  # noqa: E402
from edgeva.models.precision import calibration_frames  # noqa: E402

SHARED = REPO.parent / "shared"


@dataclass(frozen=True)
class Row:
    measure: str
    setting: str
    value: str
    note: str = ""


def skipped(measure: str, setting: str, why: str) -> Row:
    return Row(measure, setting, "skipped", why)


def timed_rate(fn: Callable[[], None], frames_per_call: int, seconds: float, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()          # predict returns host outputs: the stream's work is done when it returns
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and calls >= 3:
            return calls * frames_per_call / elapsed


def throughput(device: Optional[torch.device], seconds: float) -> list[Row]:
    rows = []
    for name in ("yolov8n", "resnet50"):
        for precision in ("fp32", "fp16"):
            for batch in (1, 8, 32):
                setting = f"{name} {precision} batch {batch}"
                if device is None:
                    rows.append(skipped("throughput", setting, "no CUDA device"))
                    continue
                torch.manual_seed(0)
                model = build_model(name, device=device)
                model.autocast_dtype = torch.float16 if precision == "fp16" else None
                frames = calibration_frames(batch, (720, 1280))
                rate = timed_rate(lambda: model.predict(frames), batch, seconds)
                rows.append(Row("throughput", setting, f"{rate:.1f} frames/s", "1280x720 uint8 in, outputs on host"))
                del model
                torch.cuda.empty_cache()
    return rows


def residual_cost(device: Optional[torch.device], seconds: float) -> list[Row]:
    from edgeva.merging import residual

    rows = []
    for batch in (1, 8):
        setting = f"yolov8n fp16 batch {batch}: plain / every conv residual"
        if device is None:
            rows.append(skipped("residual layers", setting, "no CUDA device"))
            continue
        torch.manual_seed(0)
        plain = build_model("yolov8n", device=device)
        copy = build_model("yolov8n", device=device)
        with torch.no_grad():
            for (_, a), (_, b) in zip(plain.module.named_modules(), copy.module.named_modules()):
                if residual.supports_residual(b) and isinstance(b, torch.nn.Conv2d):
                    b.weight.copy_(a.weight * (1 + 0.005 * torch.randn_like(a.weight)))   # a fine-tune's drift
                    residual.attach(b, a.weight)
        frames = calibration_frames(batch, (720, 1280))
        rates = []
        for model in (plain, copy):
            model.autocast_dtype = torch.float16
            rates.append(timed_rate(lambda: model.predict(frames), batch, seconds))
        rows.append(Row("residual layers", setting, f"{rates[0]:.1f} / {rates[1]:.1f} frames/s",
                        f"residual runs at {rates[1] / rates[0]:.2f}x the plain model's rate"))
        del plain, copy
        torch.cuda.empty_cache()
    return rows


def switch_time(device: Optional[torch.device], switches: int) -> list[Row]:
    setting = "two ResNet50s, budget holds one"
    if device is None:
        return [skipped("switch", setting, "no CUDA device")]
    torch.manual_seed(0)
    models = {k: build_model("resnet50", device=device, place=False) for k in ("a", "b")}
    one = unique_bytes([models["a"].module])
    mm = MemoryManager(int(one * 1.2), device)
    for key, model in models.items():
        model.prepare_layout()
        mm.register(key, model.module)
    frame = calibration_frames(1, (224, 224))
    resident, switching, copies, hidden = [], [], [], []
    for i in range(switches + 2):
        for key in ("a", "b"):
            start = time.perf_counter()
            _, timing = mm.run(key, lambda: models[key].predict(frame))
            switch = time.perf_counter() - start
            start = time.perf_counter()
            mm.run(key, lambda: models[key].predict(frame))         # now resident
            if i >= 2:                                              # two learning rounds first
                switching.append(switch)
                resident.append(time.perf_counter() - start)
                copies.append(timing.load_s)
                hidden.append(timing.hidden_s)
    mm.close()
    extra_ms = (statistics.median(switching) - statistics.median(resident)) * 1e3
    return [Row("switch", setting, f"{extra_ms:.1f} ms", f"median over {len(switching)} switches; "
                f"copy {statistics.median(copies) * 1e3:.1f} ms ({one / statistics.median(copies) / 1e9:.1f} GB/s), "
                f"{statistics.median(hidden) * 1e3:.1f} ms of it hidden behind execution; "
                f"Clockwork 8.3 ms load, PipeSwitch 5.4-34.6 ms")]


def swap_sla(device: Optional[torch.device], duration: float) -> list[Row]:
    if device is None:
        return [skipped("swap SLA", "tools/bench_swap.py, real copies", "no CUDA device (CPU figures: README)")]
    cmd = [sys.executable, str(REPO / "tools" / "bench_swap.py"), "--device", str(device),
           "--duration", str(duration)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration * 3 + 240)
    rows = []
    for line in out.stdout.splitlines():
        match = re.match(r"\((\w)\) (.+?)\s+within SLA\s+([\d.]+%)", line)
        if match:
            rows.append(Row("swap SLA", f"({match.group(1)}) {match.group(2).strip()}", match.group(3),
                            f"bench_swap --device {device} --duration {duration:g}"))
    if not rows:
        rows.append(Row("swap SLA", "tools/bench_swap.py", "failed", (out.stderr or out.stdout)[-200:]))
    return rows


def decode(clip: Optional[Path], frames: int) -> list[Row]:
    if clip is None or not clip.exists():
        return [skipped("decode", "clip", "no clip (../shared absent and none given)")]
    rows = []
    cap = cv2.VideoCapture(str(clip))
    size = f"{int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))}x{int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))}"
    cap.release()
    for mode in ("cpu", "cuda"):
        setting = f"{clip.name} {size} {'OpenCV' if mode == 'cpu' else 'NVDEC'}"
        cap, choice = open_capture(str(clip), "file", mode, lambda: cv2.VideoCapture(str(clip)), camera="bench")
        if mode == "cuda" and choice.kind == OPENCV:
            cap.release()
            rows.append(skipped("decode", setting, choice.reason))
            continue
        count, start = 0, time.perf_counter()
        while count < frames:
            ok, image = cap.read()
            if not ok:
                break
            count += 1
        elapsed = time.perf_counter() - start
        cap.release()
        rows.append(Row("decode", setting, f"{count / elapsed:.1f} frames/s",
                        f"{count} frames to host BGR, {choice.kind}"))
    return rows


def render(rows: list[Row], header: str) -> str:
    widths = [max(len(getattr(r, f)) for r in rows + [Row("measure", "setting", "value", "note")])
              for f in ("measure", "setting", "value", "note")]

    def line(values: tuple[str, ...]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"

    out = [header, "", line(("measure", "setting", "value", "note")), line(tuple("-" * w for w in widths))]
    out += [line((r.measure, r.setting, r.value, r.note)) for r in rows]
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "out" / "gpu_bench.md")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing window per throughput row")
    parser.add_argument("--switches", type=int, default=20)
    parser.add_argument("--swap-duration", type=float, default=8.0)
    parser.add_argument("--clip", type=Path, action="append",
                        help="clip(s) to decode (default: the largest in ../shared/videos/tune)")
    parser.add_argument("--decode-frames", type=int, default=600)
    parser.add_argument("--sections", default="throughput,switch,swap,decode,residual")
    args = parser.parse_args(argv)

    device = torch.device("cuda:0") if torch.cuda.is_available() else None
    if device is not None:
        torch.backends.cudnn.benchmark = True
    clips = args.clip or sorted((SHARED / "videos" / "tune").glob("*.mp4"),
                                key=lambda p: p.stat().st_size)[-1:] or [None]
    sections = set(args.sections.split(","))
    rows: list[Row] = []
    if "throughput" in sections:
        rows += throughput(device, args.seconds)
    if "switch" in sections:
        rows += switch_time(device, args.switches)
    if "swap" in sections:
        rows += swap_sla(device, args.swap_duration)
    if "decode" in sections:
        for clip in clips:
            rows += decode(clip, args.decode_frames)
    if "residual" in sections:
        rows += residual_cost(device, args.seconds)
    where = torch.cuda.get_device_name(0) if device is not None else f"no CUDA device ({platform.processor() or 'CPU'})"
    header = (f"edgeva GPU benchmark, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {where}, "
              f"torch {torch.__version__}, NVDEC readers: {', '.join(available_nvdec_readers()) or 'none'}")
    table = render(rows, header)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
