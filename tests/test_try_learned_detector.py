"""tools/try_learned_detector.py: the difference detector it fits is a real logistic regression
(what the README's "tried and not kept" figures for it rest on)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from try_learned_detector import Experiment  # noqa: E402


def _experiment(labels: str = "loss") -> Experiment:
    return Experiment({"img", "age", "hint"}, labels, "compete", cross_fit=False, l2=1.0)


def test_fit_recovers_which_feature_predicts_a_changed_answer():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 3))
    p = 1.0 / (1.0 + np.exp(-(-1.0 + 2.5 * x[:, 1])))      # only the second feature matters
    y = (rng.random(4000) < p).astype(float)
    mu, sd, w = _experiment().fit([(list(row), float(label)) for row, label in zip(x, y)])
    assert abs(w[2] - 2.5) < 0.3 and abs(w[0] + 1.0) < 0.2
    assert abs(w[1]) < 0.2 and abs(w[3]) < 0.2
    model = (mu, sd, w)
    assert Experiment.probability(model, [0.0, 2.0, 0.0]) > 0.95 > 0.05 > Experiment.probability(model, [0.0, -2.0, 0.0])


def test_changed_labels_treat_any_loss_as_a_change():
    """`--labels changed`: a reuse losing 0.2 agreement counts as fully changed, so the fitted
    probability for it is higher than when fitted on the fractional loss itself."""
    pairs = [([float(k % 2)], 0.2 if k % 2 else 0.0) for k in range(400)]
    loss = _experiment("loss").fit(pairs)
    changed = _experiment("changed").fit(pairs)
    assert Experiment.probability(changed, [1.0]) > 0.9
    assert 0.1 < Experiment.probability(loss, [1.0]) < 0.3
