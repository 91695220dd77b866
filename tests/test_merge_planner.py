"""Merge order and back-off (edgeva.merging.planner): pure functions over sharing groups."""
from __future__ import annotations

import random

from edgeva.merging.analysis import LayerRef, SharingGroup
from edgeva.merging.planner import Candidate, after_acceptance, back_off, plan_candidates
from edgeva.merging.signatures import LayerSignature, ParamSpec

MODELS = ("highway", "junction", "crossing", "corridor")


def group(occurrence: int, models=MODELS, channels: int = 64) -> SharingGroup:
    sig = LayerSignature("Conv2d", (("kernel_size", (3, 3)),),
                         (ParamSpec("weight", (channels, channels, 3, 3), "float32"),), True)
    return SharingGroup(sig, occurrence, tuple(LayerRef(m, f"model.{occurrence}.conv") for m in models))


def test_models_dropped_one_by_one_along_a_chain_get_a_chain_of_their_own():
    plan = Candidate([group(0)])
    subset = back_off(plan, {"junction"})                    # a check that stops at its first miss
    assert [(c.origin, c.models) for c in subset] == [("subset", ("highway", "crossing", "corridor"))]
    pair = back_off(subset[0], {"crossing"})
    assert [(c.origin, c.models) for c in pair] == [("subset", ("highway", "corridor"))]
    # the pair fails on highway: corridor is left with no partner, and the models the chain
    # dropped may still share among themselves and with it
    regrouped = back_off(pair[0], {"highway"})
    assert [(c.origin, c.models, c.left_out) for c in regrouped] == [("split", ("junction", "crossing", "corridor"), ())]
    assert regrouped[0].groups[0].members == tuple(LayerRef(m, "model.0.conv") for m in ("junction", "crossing", "corridor"))


def test_after_a_subset_is_accepted_the_models_it_left_out_are_tried_together():
    subset = back_off(back_off(Candidate([group(0)]), {"junction"})[0], {"crossing"})[0]
    assert subset.models == ("highway", "corridor") and subset.bytes_saved == group(0).signature.param_bytes
    follow = after_acceptance(subset)
    assert [(c.origin, c.models) for c in follow] == [("split", ("junction", "crossing"))]
    assert after_acceptance(follow[0]) == [] and after_acceptance(Candidate([group(0)])) == []


def test_a_failing_multi_layer_step_tries_both_halves_and_regroups_what_its_chain_left_out():
    step = plan_candidates([group(i) for i in range(4)])[0]
    assert len(step.groups) == 4
    subset = back_off(step, {"junction"})[0]
    pair = back_off(subset, {"crossing"})[0]
    follow = back_off(pair, {"highway"})                      # one model would be left: halve instead
    assert [(c.origin, c.models, len(c.groups)) for c in follow] == [
        ("halved", ("highway", "corridor"), 2), ("halved", ("highway", "corridor"), 2),
        ("split", ("junction", "crossing"), 4)]
    assert [g.occurrence for g in follow[0].groups] == [0, 1] and [g.occurrence for g in follow[1].groups] == [2, 3]


def test_back_off_always_terminates_and_never_retries_a_step():
    rng = random.Random(0)
    for _ in range(200):
        queue, seen, trials = [plan_candidates([group(i) for i in range(rng.randint(1, 8))])[0]], set(), 0
        while queue:
            c = queue.pop(0)
            key = (tuple(g.occurrence for g in c.groups), c.models)
            assert key not in seen
            seen.add(key)
            trials += 1
            if rng.random() < 0.3:
                queue[:0] = after_acceptance(c)
            else:
                queue[:0] = back_off(c, {rng.choice(c.models)})
        assert trials < 200


def test_a_candidate_round_trips_through_json_by_layer_id_whatever_its_models():
    subset = back_off(Candidate([group(0), group(1)]), {"crossing"})[0]
    by_layer = {g.layer_id: g for g in (group(0), group(1))}
    again = Candidate.from_json(subset.to_json(), by_layer)
    assert again.groups == subset.groups and again.left_out == ("crossing",) and again.origin == "subset"
    assert subset.groups[0].layer_id == group(0).layer_id != subset.groups[0].group_id
