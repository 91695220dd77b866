"""tools/bench_filter_steady.py: a looped clip's figures per pass, from the runs' kept frames."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from bench_filter_steady import camera_runs, passes, sources  # noqa: E402

from edgeva.models.tasks import PresenceTask  # noqa: E402


def test_each_frame_carries_the_last_kept_answer_of_its_run():
    assert sources(frozenset({0, 3}), 0, 6) == [0, 0, 0, 3, 3, 3]
    assert sources(frozenset({0, 2}), 1, 6) == [1, 1, 3, 3, 3]      # a run from frame 1 counts from 1


def test_each_pass_is_scored_on_its_own_frames_and_a_later_start_is_scaled_to_the_whole_pass():
    values = [False, False, True, True] * 2          # two passes of a 4-frame clip
    agree = PresenceTask.agreement
    # from frame 0: frames 0 and 2 kept in the first pass, only frame 4 in the second (6, 7 reuse "absent")
    first = passes((frozenset({0, 2, 4}),), values, agree, 4)
    assert [p.inferences for p in first] == [2, 1]
    assert first[0].agreement == 1.0 and first[1].agreement == pytest.approx(0.5)
    # from frame 1 (kept indices count from 1): frames 1 and 2 kept, 3 frames of the first pass
    # seen, so its 2 inferences count as 2 * 4 / 3
    second = passes((frozenset({0, 2, 4}), frozenset({0, 1, 5})), values, agree, 4)
    assert second[0].inferences == pytest.approx((2 + 2 * 4 / 3) / 2)
    assert second[1].inferences == pytest.approx((1 + 1) / 2)


def test_a_frame_several_queries_keep_or_audit_is_one_model_run_per_pass():
    kept_a = (frozenset({0, 2, 5}),)
    kept_b = (frozenset({0, 3, 5}),)
    audited = (frozenset({6}),)
    assert camera_runs([kept_a, kept_b, audited], 4, 2) == [3, 2]


def test_one_pass_gives_the_replay_s_own_figures():
    from bench_filtering import QueryReplay, run_camera_phases

    from edgeva.config import FilterConfig
    from edgeva.filtering import Differencer, SceneTracker
    from tests.test_filtering import count_agreement, street

    frames, counts = street(n=120)
    scene = SceneTracker(Differencer())
    prepared = [scene.prepare(f) for f in frames]
    replay = QueryReplay(counts, count_agreement, FilterConfig(audit_fraction=0.0), "area")
    run = run_camera_phases(prepared, scene, [replay], 10.0, 3)[0]
    (only,) = passes(run.kept, counts, count_agreement, len(counts))
    assert only.inferences == pytest.approx(run.inferences)
    assert only.agreement == pytest.approx(run.agreement)


def test_a_query_that_looks_ahead_is_scored_on_the_answers_its_gaps_took():
    values = [0, 0, 1, 1] * 2
    agree = lambda a, b: float(a == b)     # noqa: E731
    kept = (frozenset({0, 3, 4, 7}),)
    # carried from the last kept frame, frame 2 keeps frame 0's answer; its gap bisected, frame 2's own
    assert passes(kept, values, agree, 4)[0].agreement == pytest.approx(0.75)
    answered_by = ((0, 1, 2, 3, 4, 5, 6, 7),)
    assert [p.agreement for p in passes(kept, values, agree, 4, answered_by)] == [1.0, 1.0]
    # a run from frame 1 counts its answers from 1, as its kept frames: (0, 1, 1, ...) is frames 1, 2, 2, ...
    both = passes((frozenset(range(8)), frozenset({0, 1, 3, 5})), values, agree, 4,
                  (tuple(range(8)), (0, 1, 1, 3, 3, 5, 5)))
    assert [p.agreement for p in both] == [1.0, 1.0]
    assert both[0].inferences == pytest.approx((4 + 2 * 4 / 3) / 2)
