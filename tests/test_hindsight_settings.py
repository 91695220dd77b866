"""tools/hindsight_settings.py: the ceiling of edgeva's kind of filter (settings chosen with the
every-frame results), which README's filtering table reports next to the filter."""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from hindsight_settings import best_in_hindsight, fewest_inferences  # noqa: E402

from edgeva.filtering import Differencer, tune_features  # noqa: E402
from edgeva.filtering.tuner import age_candidates  # noqa: E402
from tests.test_filtering import background, count_agreement, draw_car, noisy, street  # noqa: E402

FEATURES = ("pixel", "area", "edge")


def test_fewest_inferences_is_the_exact_cheapest_combination():
    rng = np.random.default_rng(3)
    for _ in range(20):
        options = [{int(k): float(rng.uniform(0.5 * 10, 10)) for k in rng.choice(np.arange(1, 8), 3, replace=False)}
                   for _ in range(3)]
        target = float(rng.uniform(0.7, 0.95))
        brute = min((sum(k for k, _ in combo) for combo in itertools.product(*(o.items() for o in options))
                     if sum(a for _, a in combo) >= target * 30), default=30)
        assert fewest_inferences(options, 30, target).inferences == brute


def test_a_threshold_that_catches_the_one_change_needs_two_inferences():
    rng = np.random.default_rng(0)
    bg = background()
    frames, counts = [], []
    for t in range(100):
        img = bg.copy()
        if t >= 50:
            draw_car(img, 140, 80)
        frames.append(noisy(img, rng))
        counts.append(int(t >= 50))
    d = Differencer()
    prepared = [d.prepare(f) for f in frames]
    best = best_in_hindsight(prepared, counts, count_agreement, d, FEATURES, fps=10.0, target=0.9,
                             longest=99, segment_s=None)
    assert (best.inferences, best.agreement) == (2, 1.0)     # the first frame, and the car's arrival


@pytest.fixture(scope="module")
def street_clip():
    frames, counts = street()
    d = Differencer()
    return [d.prepare(f) for f in frames], counts, d


def test_one_setting_in_hindsight_infers_no_more_than_the_tuner_chooses_on_the_same_clip(street_clip):
    prepared, counts, d = street_clip
    best = best_in_hindsight(prepared, counts, count_agreement, d, FEATURES, fps=10.0, target=0.9,
                             longest=60, segment_s=None)
    tuned = tune_features(prepared, counts, count_agreement, 0.9, features=FEATURES, differencer=d,
                          max_ages=age_candidates(60))[0]
    assert best.agreement >= 0.9
    assert best.inferences <= round((1 - tuned.skip_fraction) * len(prepared))


def test_a_setting_per_segment_meets_the_target_on_every_segment(street_clip):
    prepared, counts, d = street_clip
    whole = best_in_hindsight(prepared, counts, count_agreement, d, FEATURES, fps=10.0, target=0.9,
                              longest=60, segment_s=10.0, each_segment=True)
    parts = [best_in_hindsight(prepared[k:k + 100], counts[k:k + 100], count_agreement, d, FEATURES, fps=10.0,
                               target=0.9, longest=60, segment_s=None) for k in range(0, 400, 100)]
    assert all(p.agreement >= 0.9 for p in parts)
    assert whole.inferences == sum(p.inferences for p in parts)
    assert whole.agreement == pytest.approx(sum(p.agreement for p in parts) / 4)
    # the empty street and the parked car need only the staleness bound (60 of 100 frames: two
    # inferences); the crossing car needs more
    assert parts[0].inferences == parts[2].inferences == 2 < parts[1].inferences
