"""Per-query frame-difference filtering: features, keep/skip decisions, audits, tuning, profiles.

Flow per camera frame: `SceneTracker.prepare(image)` once (downscale, grey, blur, the camera's
background), then each query's `QueryFilter.decide(prepared)` compares it with *that query's*
last inferred frame.
Skipped frames reuse the last result; a random share of them is audited (the model runs anyway)
so the filter's agreement with every-frame inference is measured online; the camera's queries
share each frame's draw (`audit_draw`), so they audit the same frames.
"""
from .audits import AuditTracker, audit_draw, audit_fraction_for_power, audits_needed, wilson_lower_bound
from .features import FEATURES, Differencer, FeatureName, FeatureVector, Prepared, SceneTracker, default_feature
from .policy import Decision, QueryFilter, longest_age, run_inline, tunable_features
from .profiles import ProfileTable, Setting, segment_key
from .tuner import (
    NO_THRESHOLD, CurvePoint, PairCache, TuneResult, age_candidates, default_candidates, simulate_filter,
    tune_features, tune_segments, tune_threshold, uniform_sources,
)

__all__ = [
    "AuditTracker", "CurvePoint", "Decision", "Differencer", "FEATURES", "FeatureName", "FeatureVector",
    "NO_THRESHOLD", "PairCache", "Prepared", "ProfileTable", "QueryFilter", "SceneTracker", "longest_age", "run_inline", "tunable_features", "Setting", "TuneResult",
    "age_candidates", "audit_draw", "audit_fraction_for_power", "audits_needed", "default_candidates", "default_feature",
    "segment_key", "simulate_filter", "tune_features", "tune_segments", "tune_threshold", "uniform_sources", "wilson_lower_bound",
]
