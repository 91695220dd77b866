"""tools/bench_filtering.py's baselines: uniform sampling phase-averaged, and the interval a user
would choose without hindsight (what README's filtering tables compare the filter with)."""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from bench_filtering import every_k, largest_interval, uniform_curve, uniform_needs, uniform_needs_one_frame_either_way  # noqa: E402

from edgeva.models.tasks import PresenceTask  # noqa: E402


def test_every_k_averages_over_phases_and_counts_the_first_frame():
    values = [False] * 10 + [True] * 10          # the answer flips once, at frame 10
    agree = PresenceTask.agreement
    assert every_k(values, agree, 1) == (20.0, 1.0)
    inferred, agreement = every_k(values, agree, 8)      # 8 phases: 0..7
    # phase p infers frame 0 and p, p+8, p+16: the flip at frame 10 is seen at the first of
    # those at or after 10, and the frames between reuse "absent"
    seen = [next(i for i in range(p, 40, 8) if i >= 10) for p in range(8)]
    assert inferred == sum(len({0, *range(p, 20, 8)}) for p in range(8)) / 8
    assert agreement == pytest.approx(sum(1 - (min(s, 20) - 10) / 20 for s in seen) / 8)
    assert uniform_curve(values, agree)[7] == (inferred, agreement)


def test_the_largest_interval_is_the_last_k_meeting_the_target():
    values = [False] * 10 + [True] * 10
    agree = PresenceTask.agreement
    k = largest_interval([(values, agree)])
    assert every_k(values, agree, k)[1] >= 0.9 > every_k(values, agree, k + 1)[1]
    assert largest_interval([([True] * 20, agree)]) == 20     # an answer that never changes: one inference


def test_one_frame_of_agreement_either_way_shows_where_uniform_sampling_s_curve_is_a_cliff():
    agree = PresenceTask.agreement
    # A person that is never there but for one ghost frame: every interval misses the ghost on
    # most phases, so uniform sampling reaches 0.995 with one inference and needs every frame for 1.
    ghost = [False] * 100 + [True] + [False] * 99
    curve = uniform_curve(ghost, agree)
    lower, higher = uniform_needs_one_frame_either_way(curve, 1.0, len(ghost))
    assert higher == uniform_needs(curve, 1.0) == 200
    assert lower <= 2                                     # 0.995: one frame wrong
    # A person who comes and stays: the curve is smooth, one frame either way moves the need a little.
    stays = [False] * 100 + [True] * 100
    curve = uniform_curve(stays, agree)
    need = uniform_needs(curve, 0.95)
    lower, higher = uniform_needs_one_frame_either_way(curve, 0.95, len(stays))
    assert lower < need < higher
    assert higher / lower < 1.5


def test_the_filter_is_averaged_over_the_frame_it_starts_on_as_uniform_is_over_its_phase():
    from bench_filtering import run_edgeva, run_edgeva_phases

    from edgeva.config import FilterConfig
    from edgeva.filtering import Differencer, SceneTracker
    from tests.test_filtering import count_agreement, street

    frames, counts = street(n=200)
    scene = SceneTracker(Differencer())
    prepared = [scene.prepare(f) for f in frames]
    cfg = FilterConfig(threshold=0.02, max_age_s=1.0, feature="area", audit_fraction=0.0)
    single = run_edgeva(prepared, scene, counts, count_agreement, 10.0, cfg, "area")
    assert run_edgeva_phases(prepared, scene, counts, count_agreement, 10.0, cfg, "area", 1) == single
    runs = [run_edgeva(prepared[p:], scene, counts[p:], count_agreement, 10.0, cfg, "area") for p in range(4)]
    averaged = run_edgeva_phases(prepared, scene, counts, count_agreement, 10.0, cfg, "area", 4)
    assert len({r.inferences for r in runs}) > 1                    # where it starts moves what it infers
    assert averaged.agreement == pytest.approx(sum(r.agreement for r in runs) / 4)
    assert averaged.inferences == pytest.approx(sum(r.inferences * 200 / (200 - p) for p, r in enumerate(runs)) / 4)


def test_the_bound_only_baseline_samples_at_an_interval_the_checks_adapt_to_the_answer():
    """`--bound-only`: the daemon's filter with no change feature and no calibration. It keeps
    frames only at its staleness bound (and confirms a changed answer), and the checks at the bound
    shorten that bound where the answer keeps changing."""
    from bench_filtering import bound_only_config, run_edgeva

    from edgeva.filtering import Differencer, SceneTracker
    from tests.test_filtering import count_agreement, street

    frames, counts = street(n=200)
    scene = SceneTracker(Differencer())
    prepared = [scene.prepare(f) for f in frames]
    cfg = replace(bound_only_config(2.0), audit_fraction=0.0)
    assert cfg.threshold == float("inf") and cfg.max_age_s == 2.0
    still = run_edgeva(prepared, scene, [1] * 200, count_agreement, 10.0, cfg, "area")
    assert set(still.kept_by_reason) == {"first", "stale"}
    assert still.inferences == pytest.approx(1 + 199 // 21, abs=1)         # every 21st frame: 20 reused
    flicker = [1 + (i // 3) % 2 for i in range(200)]                       # the count changes every 3 frames
    busy = run_edgeva(prepared, scene, flicker, count_agreement, 10.0, cfg, "area")
    assert set(busy.kept_by_reason) <= {"first", "stale", "confirm"}
    assert busy.inferences > 2 * still.inferences                           # the checks shortened the bound


def test_a_frame_several_queries_keep_is_one_model_run_of_the_camera():
    from bench_filtering import Run, model_runs

    vehicles = Run(3, 1.0, kept=(frozenset({0, 5, 9}), frozenset({0, 4})))     # two start frames
    persons = Run(2, 1.0, kept=(frozenset({0, 7}), frozenset({0, 4})))
    # start frame 0: {0, 5, 7, 9} of 10 frames; start frame 1: {0, 4} of 9, scaled to 10
    assert model_runs([vehicles, persons], 10) == pytest.approx((4 + 2 * 10 / 9) / 2)
    # an audit is a model run too, unless another query kept (or audited) that frame
    vehicles.audited, persons.audited = (frozenset({2, 5}), frozenset()), (frozenset({2}), frozenset({3}))
    assert model_runs([vehicles, persons], 10) == pytest.approx((4 + 2 * 10 / 9) / 2)
    assert model_runs([vehicles, persons], 10, audits=True) == pytest.approx((5 + 3 * 10 / 9) / 2)


def test_a_camera_s_queries_are_replayed_together_the_later_ones_keeping_what_the_model_runs_anyway():
    """As in the daemon, a query later in the camera's order keeps for free the frames an
    earlier one keeps; without sharing each query decides as if alone on the camera."""
    from bench_filtering import QueryReplay, run_camera, run_edgeva

    from edgeva.config import FilterConfig
    from edgeva.filtering import Differencer, SceneTracker
    from tests.test_filtering import count_agreement, street

    frames, counts = street(n=200)
    scene = SceneTracker(Differencer())
    prepared = [scene.prepare(f) for f in frames]
    eager = QueryReplay(counts, count_agreement, FilterConfig(threshold=0.0, max_age_s=0.2, feature="area",
                                                              audit_fraction=0.0), "area")
    lax = QueryReplay(counts, count_agreement, FilterConfig(threshold=0.5, max_age_s=10.0, feature="area",
                                                            audit_fraction=0.0), "area")
    alone = run_edgeva(prepared, scene, counts, count_agreement, 10.0, lax.cfg, "area")
    assert run_camera(prepared, scene, [eager, lax], 10.0, share=False)[1] == alone
    first, second = run_camera(prepared, scene, [eager, lax], 10.0)
    assert first == run_edgeva(prepared, scene, counts, count_agreement, 10.0, eager.cfg, "area")
    assert second.kept[0] >= first.kept[0] and second.kept_by_reason["shared"] > 0
    assert second.agreement > alone.agreement


def test_the_replay_looking_ahead_bisects_each_query_s_gaps_and_counts_the_bisection():
    from bench_filtering import QueryReplay, bisect_gaps, run_camera

    import numpy as np

    from edgeva.config import FilterConfig
    from edgeva.filtering import Differencer, SceneTracker

    answers = [False] * 13 + [True] * 19
    taken, source = bisect_gaps(answers, PresenceTask.agreement, [0, 8, 16, 24])
    assert taken == {0, 8, 16, 24, 31, 12, 14, 13} and all(answers[i] == answers[s] for i, s in enumerate(source))
    scene = SceneTracker(Differencer())
    still = np.full((90, 160, 3), 120, np.uint8)
    prepared = [scene.prepare(still) for _ in answers]
    cfg = FilterConfig(threshold=1.0, max_age_s=0.7, audit_fraction=0.0)        # kept every 8th frame
    replay = QueryReplay(answers, PresenceTask.agreement, cfg, None)
    (reusing,) = run_camera(prepared, scene, [replay], fps=10.0)
    (ahead,) = run_camera(prepared, scene, [replay], fps=10.0, look_ahead=True)
    assert reusing.agreement < 1.0 and ahead.agreement == 1.0
    own = sum(count for reason, count in ahead.kept_by_reason.items() if reason != "bisect")
    assert ahead.inferences == len(ahead.kept[0]) == own + ahead.kept_by_reason["bisect"]
    assert ahead.kept_by_reason["bisect"] >= 3                  # 8..16 bisected: 12, 14, 13
