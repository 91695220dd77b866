"""tools/bench_lookahead.py: every k-th frame with the gaps whose ends disagree bisected."""
from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from bench_filtering import mean_agreement  # noqa: E402
from bench_lookahead import camera_look_ahead, camera_phases, look_ahead  # noqa: E402

from edgeva.models.tasks import CountTask, PresenceTask  # noqa: E402

present = PresenceTask.agreement


def test_a_change_that_lasts_is_located_to_the_frame_with_a_few_more_inferences():
    values = [False] * 13 + [True] * 19            # one change, at frame 13
    inferred, source = look_ahead(values, present, 8)
    assert mean_agreement(present, values, source) == 1.0
    strided = {0, 8, 16, 24, 31}
    # the gap 8..16 is bisected: 12 (absent), 14 (present), 13 (present)
    assert inferred == strided | {12, 14, 13}
    assert source[12:16] == [12, 13, 14, 14]


def test_an_excursion_between_two_frames_that_agree_is_missed_as_uniform_sampling_misses_it():
    values = [False] * 32
    values[10] = True                               # a one-frame ghost inside the gap 8..16
    inferred, source = look_ahead(values, present, 8)
    assert inferred == {0, 8, 16, 24, 31}
    assert mean_agreement(present, values, source) == 31 / 32
    values[16] = True
    values[10] = False                              # the ghost on an inferred frame: both sides bisected
    inferred, source = look_ahead(values, present, 8)
    assert mean_agreement(present, values, source) == 1.0
    assert {12, 14, 15, 20, 18, 17} <= inferred


def test_at_the_same_stride_looking_ahead_never_agrees_less_than_uniform_sampling():
    rng = random.Random(3)
    agree = CountTask.agreement
    for _ in range(40):
        values, count = [], 2
        for _ in range(120):
            if rng.random() < 0.08:
                count = max(0, count + rng.choice((-1, 1)))
            values.append({"car": count + (1 if rng.random() < 0.05 else 0)})
        for k in (2, 3, 5, 8):
            uniform_source = [(i // k) * k for i in range(len(values))]
            _, source = look_ahead(values, agree, k)
            assert mean_agreement(agree, values, source) >= mean_agreement(agree, values, uniform_source)


def test_a_later_query_splits_its_gaps_at_frames_the_model_ran_for_an_earlier_one():
    vehicles = [{"car": 1}] * 7 + [{"car": 2}] * 17       # a car arrives at frame 7
    persons = [{"person": 0}] * 24
    persons[7] = {"person": 1}                             # a one-frame ghost on that frame
    queries = [(vehicles, CountTask.agreement), (persons, CountTask.agreement)]
    (ran_vehicles, a_vehicles), (ran_persons, a_persons) = camera_look_ahead(queries, 8)
    assert ran_vehicles == {0, 8, 16, 23, 4, 6, 7} and a_vehicles == 1.0
    # the vehicle query's bisection ran frame 7: the person query sees its ghost there and
    # bisects around it (no model run of its own: 4 and 6 ran too), so it answers every frame right
    assert a_persons == 1.0 and ran_persons == ran_vehicles
    (_, alone_vehicles), (ran_alone, alone_persons) = camera_look_ahead(queries, 8, share=False)
    assert ran_alone == {0, 8, 16, 23} and alone_persons == 23 / 24     # alone, the ghost is missed
    stats, runs = camera_phases(queries, 8, phases=1)
    assert runs == len(ran_vehicles | ran_persons)
    assert stats[1] == (len(ran_persons), 1.0, 1.0)
