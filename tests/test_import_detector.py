"""tools/import_openvino_detector.py: the real INT8 export becomes a PyTorch checkpoint that
edgeva runs, and its detections match the export's on real frames."""
from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import import_openvino_detector as importer  # noqa: E402

from edgeva.models import build_model  # noqa: E402
from edgeva.models.tasks import CountTask  # noqa: E402


@pytest.mark.parametrize("node, path", [
    ("/model.22/cv3.2/cv3.2.1/conv/Conv/WithoutBiases", "model.22.cv3.2.1.conv"),
    ("/model.22/cv3.2/cv3.2.2/Conv/WithoutBiases", "model.22.cv3.2.2"),
    ("/model.21/m.0/cv2/conv/Conv/WithoutBiases", "model.21.m.0.cv2.conv"),
    ("/model.0/conv/Conv/WithoutBiases", "model.0.conv"),
    ("/model.22/dfl/conv/Conv", "model.22.dfl.conv"),
])
def test_exporter_node_names_map_to_module_paths(node, path):
    assert importer.module_path(node) == path


def test_a_directory_without_one_ir_file_is_refused(tmp_path):
    with pytest.raises(importer.ImportError_, match="one .xml"):
        importer.build_checkpoint(tmp_path)


def test_imported_detector_runs_in_edgeva_and_matches_the_export(shared_dir, tmp_path):
    export = shared_dir / "weights" / "yolov8n_int8_openvino_model"
    out = tmp_path / "yolov8n.pt"
    model = importer.build_checkpoint(export)
    importer.save_checkpoint(model, out, export)

    # Every convolution carries the dequantised IR weight; batch norms are identities.
    convs = importer.read_convolutions(next(export.glob("*.xml")))
    modules = dict(model.named_modules())
    w, _ = convs["model.8.m.0.cv1.conv"]
    assert torch.equal(modules["model.8.m.0.cv1.conv"].weight, torch.from_numpy(w))
    x = torch.randn(1, 32, 8, 8)
    block = modules["model.2.cv1"]
    assert torch.allclose(block.bn(block.conv(x)), block.conv(x) + block.bn.bias.view(1, -1, 1, 1), atol=1e-5)

    ours, theirs = build_model("yolov8n", str(out)), build_model("yolov8n", str(export))
    assert ours.is_torch and ours.module is not None
    ours.min_score = theirs.min_score = 0.3
    cap = cv2.VideoCapture(str(shared_dir / "videos" / "tune" / "bgslibrary_video03_highway.avi"))
    scores, found = [], 0
    for i in range(60):
        ok, frame = cap.read()
        assert ok
        if i % 3:
            continue
        a, b = ours.predict([frame])[0], theirs.predict([frame])[0]
        found += len(a)
        scores.append(CountTask.agreement(importer._counts(a, 0.3, ours.class_names),
                                          importer._counts(b, 0.3, theirs.class_names)))
    assert found > 20                       # a real detector: vehicles on a highway
    assert np.mean(scores) > 0.75           # activations are no longer quantised: close, not equal
