#!/usr/bin/env python3
"""Experiment (not used by the daemon): a learned difference detector, NoScope-style, in place
of one change feature's threshold, judged with tools/bench_filtering.py.

During a dense window the model ran on every frame, so every pair (reference frame i, later
frame j within the longest staleness bound) is a labelled example: features of j against i ->
how much reusing i's answer at j loses (1 - agreement, or whether the answer changed). A logistic
regression (IRLS, L2, numpy) is fitted on those pairs and its probability becomes one more
"feature" the tuner replays (threshold on the probability, staleness bound, the same rule and
margin), competing with pixel/area/edge/foreground (`--select compete`) or alone (`only`).

Pair features (`--features`, comma-separated):
  img   log pixel change, log foreground-share change, log foreground share of frame j
  box   log changed share inside / outside the reference's boxes of the query's classes (+30 %)
  age   log(j - i)
  hint  the reference result's own instability: log(1 + confident boxes), log(1 + boxes within
        [confidence - 0.05, confidence + 0.1)), the smallest |score - confidence| (boxes >= 0.25,
        the detectors' default min_score, as the daemon would see them)
`--cross-fit` tunes the probability threshold on out-of-sample scores (each pooled window scored
by the fit on the others; a lone window's halves by each other's fit).

This process only: the tuner entry points and Differencer.feature are wrapped here, then
bench_filtering's main runs with the remaining arguments, e.g.

    nice -n 19 .venv/bin/python tools/try_learned_detector.py --features img,age,hint --clips tune [--tuned-first-third]
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import bench_filtering as bench  # noqa: E402
import edgeva.filtering.windows as windows  # noqa: E402
import edgeva.tuning as tuning  # noqa: E402
from edgeva.config import FilterConfig  # noqa: E402
from edgeva.filtering import Differencer, tuner  # noqa: E402
from edgeva.filtering.features import Prepared  # noqa: E402

MIN_SCORE = 0.25        # the detectors' default min_score: what the daemon's outputs hold
BOX_GROW = 0.3
PROBABILITIES = (0.0,) + tuple(float(x) for x in np.geomspace(1e-3, 1.0, 30))


class Experiment:
    """The current clip/query's reference results and the detectors fitted so far."""

    def __init__(self, features: set[str], labels: str, select: str, cross_fit: bool, l2: float) -> None:
        self.features, self.labels, self.select, self.cross_fit, self.l2 = features, labels, select, cross_fit, l2
        self.index: dict[int, int] = {}          # id(prepared) -> frame number in the clip
        self.hints: list[tuple[float, float, float]] = []
        self.detections: list[Any] = []
        self.class_ids: list[int] = []
        self.frame_size: tuple[int, int] = (1, 1)
        self.box_masks: dict[int, np.ndarray] = {}
        self.models: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    # --------------------------------------------------------------- reference results
    def set_query(self, ref: Any, classes: list[str]) -> None:
        self.class_ids = [ref.class_names.index(c) for c in classes]
        self.detections = ref.detections
        self.box_masks = {}
        self.hints = []
        for d in ref.detections:
            scores = d.scores[np.isin(d.class_ids, self.class_ids) & (d.scores >= MIN_SCORE)]
            conf = bench.CONFIDENCE
            self.hints.append((math.log1p(int((scores >= conf).sum())),
                               math.log1p(int(((scores >= conf - 0.05) & (scores < conf + 0.1)).sum())),
                               float(np.abs(scores - conf).min()) if len(scores) else 0.7))

    def box_mask(self, i: int, shape: tuple[int, int]) -> np.ndarray:
        mask = self.box_masks.get(i)
        if mask is None:
            h, w = shape
            sy, sx = h / self.frame_size[0], w / self.frame_size[1]
            mask = np.zeros((h, w), bool)
            d = self.detections[i]
            for (x1, y1, x2, y2), score, c in zip(d.boxes, d.scores, d.class_ids):
                if c in self.class_ids and score >= MIN_SCORE:
                    gw, gh = BOX_GROW * (x2 - x1), BOX_GROW * (y2 - y1)
                    mask[max(0, int((y1 - gh) * sy)):int((y2 + gh) * sy) + 1,
                         max(0, int((x1 - gw) * sx)):int((x2 + gw) * sx) + 1] = True
            self.box_masks[i] = mask
        return mask

    # --------------------------------------------------------------- the detector
    def vector(self, d: Differencer, ref: Prepared, cur: Prepared) -> list[float]:
        i, j = self.index[id(ref)], self.index[id(cur)]
        out: list[float] = []
        if "img" in self.features:
            out += [math.log(d.feature(ref, cur, "pixel") + 1e-3),
                    math.log(abs(cur.foreground - ref.foreground) + 1e-3), math.log(cur.foreground + 1e-3)]
        if "box" in self.features:
            changed = d.change_mask(ref.gray, ref.mean, cur.gray, cur.mean) > 0
            boxes = self.box_mask(i, changed.shape)
            inside = float(changed[boxes].mean()) if boxes.any() else 0.0
            outside = float(changed[~boxes].mean()) if (~boxes).any() else 0.0
            out += [math.log(inside + 1e-3), math.log(outside + 1e-3)]
        if "age" in self.features:
            out.append(math.log(max(1, j - i)))
        if "hint" in self.features:
            out += list(self.hints[i])
        return out

    def fit(self, pairs: list[tuple[list[float], float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.array([p[0] for p in pairs])
        y = np.array([p[1] for p in pairs])
        if self.labels == "changed":
            y = (y > 0).astype(float)
        mu, sd = x.mean(0), x.std(0) + 1e-9
        z = np.hstack([np.ones((len(x), 1)), (x - mu) / sd])
        w = np.zeros(z.shape[1])
        ridge = self.l2 * np.diag(np.r_[0.0, np.ones(len(w) - 1)])
        for _ in range(30):
            p = 1.0 / (1.0 + np.exp(-np.clip(z @ w, -30, 30)))
            step = np.linalg.solve((z * (p * (1 - p) + 1e-9)[:, None]).T @ z + ridge, z.T @ (p - y) + ridge @ w)
            w -= step
            if np.abs(step).max() < 1e-7:
                break
        return mu, sd, w

    @staticmethod
    def probability(model: tuple[np.ndarray, np.ndarray, np.ndarray], x: list[float]) -> float:
        mu, sd, w = model
        return float(1.0 / (1.0 + math.exp(-float(np.clip(w[0] + ((np.asarray(x) - mu) / sd) @ w[1:], -30, 30)))))

    def pairs(self, d: Differencer, frames: list[Prepared], values: list[Any], agreement: Callable[[Any, Any], float],
              longest: int) -> list[tuple[list[float], float]]:
        return [(self.vector(d, frames[i], frames[j]), 1.0 - agreement(values[j], values[i]))
                for i in range(len(frames)) for j in range(i + 1, min(len(frames), i + longest + 1))]

    def tune(self, segs: list[list[Prepared]], vals: list[list[Any]], agreement: Callable[[Any, Any], float],
             target: float, d: Differencer, **kwargs: Any) -> Optional[tuner.TuneResult]:
        longest = max(kwargs.get("max_ages") or (30,))
        everything = [p for f, v in zip(segs, vals) for p in self.pairs(d, f, v, agreement, longest)]
        if len(everything) < 10:
            return None
        model = self.fit(everything)
        name = f"learned:{len(self.models)}"
        self.models[name] = model
        scored: list[tuple[Callable[[int, int], float], list[Any]]] = []
        if self.cross_fit:
            if len(segs) > 1:
                held = [(f, v, [p for k2, (f2, v2) in enumerate(zip(segs, vals)) if k2 != k
                                for p in self.pairs(d, f2, v2, agreement, longest)])
                        for k, (f, v) in enumerate(zip(segs, vals))]
            else:
                h = len(segs[0]) // 2
                halves = [(segs[0][:h], vals[0][:h]), (segs[0][h:], vals[0][h:])]
                held = [(f, v, self.pairs(d, *halves[1 - k], agreement, longest)) for k, (f, v) in enumerate(halves)]
            for f, v, train in held:
                m = self.fit(train) if len(train) >= 10 else model
                scored.append((lambda i, j, f=f, m=m: self.probability(m, self.vector(d, f[i], f[j])), v))
        else:
            scored = [(lambda i, j, f=f: self.probability(model, self.vector(d, f[i], f[j])), v)
                      for f, v in zip(segs, vals)]
        rest = {k: v for k, v in kwargs.items() if k not in ("features", "preferred")}
        return replace(tuner.tune_segments(scored, agreement, target, candidates=PROBABILITIES, **rest), feature=name)


def install(exp: Experiment) -> None:
    """Wrap the bench's and the tuner's entry points in this process."""
    query_values, run_edgeva_phases, first_third, decode = (bench.query_values, bench.run_edgeva_phases,
                                                            bench.tuned_on_first_third, bench.decode)

    def query_values_(ref: Any, query: str) -> list[Any]:
        exp.set_query(ref, bench.QUERIES[query][1])
        return query_values(ref, query)

    def indexed(fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(prepared: list[Prepared], *args: Any, **kwargs: Any) -> Any:
            exp.index = {id(p): i for i, p in enumerate(prepared)}
            return fn(prepared, *args, **kwargs)
        return run

    def decode_(clip: Path) -> list[np.ndarray]:
        frames = decode(clip)
        exp.frame_size = frames[0].shape[:2]
        return frames

    bench.query_values, bench.decode = query_values_, decode_
    # indexed by the whole clip's frames: the phases' runs are slices of it
    bench.run_edgeva_phases, bench.tuned_on_first_third = indexed(run_edgeva_phases), indexed(first_third)

    feature = Differencer.feature

    def feature_(self: Differencer, ref: Prepared, cur: Prepared, name: str) -> float:
        if name.startswith("learned:"):
            return exp.probability(exp.models[name], exp.vector(self, ref, cur))
        return feature(self, ref, cur, name)

    Differencer.feature = feature_   # type: ignore[method-assign]

    tune_features = tuner.tune_features

    def tune_features_(frames: Any, values: Any, agreement: Callable[[Any, Any], float], target: float, *,
                       segments: bool = False, differencer: Optional[Differencer] = None, **kwargs: Any) -> list:
        results = tune_features(frames, values, agreement, target, segments=segments, differencer=differencer, **kwargs)
        segs, vals = (frames, values) if segments else ([frames], [values])
        learned = exp.tune(segs, vals, agreement, target, differencer or Differencer(), **kwargs)
        if learned is None:
            return results
        if exp.select == "only":
            return [learned]
        return sorted(results + [learned], key=lambda r: (not r.met_target, -r.skip_fraction))

    windows.tune_features = tune_features_   # type: ignore[assignment]
    tuning.tune_features = tune_features_    # type: ignore[assignment]
    # The pairs are labelled with the model's answer on every frame of a window: windows infer
    # every frame here, as they did when this experiment was measured.
    bench.FilterConfig = DenseWindows        # type: ignore[misc]


@dataclass
class DenseWindows(FilterConfig):
    calibration_stride: int = 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", default="img,age,hint")
    ap.add_argument("--labels", choices=("loss", "changed"), default="loss",
                    help="loss: 1 - agreement (fractional); changed: whether the answer changed")
    ap.add_argument("--select", choices=("compete", "only"), default="compete")
    ap.add_argument("--cross-fit", action="store_true")
    ap.add_argument("--l2", type=float, default=1.0)
    args, rest = ap.parse_known_args()
    install(Experiment(set(args.features.split(",")), args.labels, args.select, args.cross_fit, args.l2))
    sys.argv = [sys.argv[0], *rest]
    bench.main()


if __name__ == "__main__":
    main()
