"""Gemel-style model merging: identical layers across a workload's models share one tensor.

- `analyse_modules` / `format_analysis`: groups of identical layers and the bytes they save;
- `IncrementalMerger`: Gemel's largest-first incremental merge, retrained by distillation;
- `save_bundle` / `load_bundle` / `apply_bundle`: the merged bundle the daemon loads;
- `dense_bytes`: what a model alone would hold with its residual layers dense (unmerged size);
- `merge_main(argv)`: the `edgeva merge` command.
"""
from .analysis import Analysis, LayerRef, SharingGroup, analyse_modules, format_analysis
from .bundle import BundleError, MergedBundle, ModelMeta, apply_bundle, load_bundle, save_bundle
from .cli import merge_main
from .memory import MemoryMeasurement, resident_weight_bytes
from .residual import dense_bytes
from .merger import IncrementalMerger, MergeSettings, MergeState
from .report import build_report, format_report
from .signatures import LayerSignature, layer_signature
from .workload import CameraFrames, QuerySpec, Workload, workload_from_config

__all__ = [
    "Analysis", "BundleError", "CameraFrames", "IncrementalMerger", "LayerRef", "LayerSignature", "MemoryMeasurement",
    "MergeSettings", "MergeState", "MergedBundle", "ModelMeta", "QuerySpec", "SharingGroup", "Workload",
    "analyse_modules", "apply_bundle", "build_report", "dense_bytes", "format_analysis", "format_report", "layer_signature",
    "load_bundle", "merge_main", "resident_weight_bytes", "save_bundle", "workload_from_config",
]
