"""Model zoo, weights loading and task post-processing (edgeva.models).

Default tests build only yolov8n, resnet18 and mobilenet_v3_small from architecture on
small frames; the rest of the zoo is constructed in one slow test. A guard makes any
network attempt fail at once, so nothing here can hang offline.
"""
from __future__ import annotations

import importlib.util

import logging
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from edgeva.config import TaskConfig
from edgeva.models import (COCO_NAMES, ClassProbs, Detections, ModelLoadError, TaskError,
                           UnknownModelError, build_model, build_task, resolve_device, zoo_kind,
                           zoo_names)
from edgeva.models.coco import COCO91_TO_80
from edgeva.models.preprocess import letterbox_batch
from edgeva.models.tasks import ClassifyTask, CountTask, DetectTask, PassthroughTask, PresenceTask
from edgeva.models.torchvision_zoo import TorchvisionDetector

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
SHARED_WEIGHTS = SHARED / "weights"
TUNE_VIDEO = SHARED / "videos" / "tune" / "ahmetozlu_vehicle_counting_input_video.mp4"
ZOO = ["yolov8n", "yolov8s", "yolo11n", "yolo11s", "resnet18", "resnet50", "vgg16", "alexnet",
       "mobilenet_v3_small", "mobilenet_v3_large", "inception_v3", "fasterrcnn_resnet50_fpn", "yolov8n-cls"]


# ------------------------------------------------------------------ fixtures

class NetworkAttempt(OSError):
    pass


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every DNS lookup or non-local connect fails at once and is recorded."""
    attempts: list[str] = []
    real_connect = socket.socket.connect

    def refuse_lookup(host, *args, **kwargs):
        attempts.append(f"getaddrinfo {host}")
        raise NetworkAttempt(f"network disabled in tests: lookup {host}")

    def guarded_connect(self, address):
        if self.family == socket.AF_UNIX or (isinstance(address, tuple) and address[0] in ("127.0.0.1", "::1")):
            return real_connect(self, address)
        attempts.append(f"connect {address}")
        raise NetworkAttempt(f"network disabled in tests: connect {address}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse_lookup)
    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    return attempts


@pytest.fixture(scope="module")
def yolo():
    return build_model("yolov8n")


@pytest.fixture(scope="module")
def mobilenet():
    return build_model("mobilenet_v3_small")


def frame(h: int = 96, w: int = 160, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def fake_detector(class_names=COCO_NAMES):
    return type("FakeDetector", (), {"name": "fakedet", "kind": "detector", "class_names": list(class_names)})()


def fake_classifier(class_names=("cat", "dog", "bird")):
    return type("FakeClassifier", (), {"name": "fakecls", "kind": "classifier", "class_names": list(class_names)})()


# ------------------------------------------------------------------ zoo

def test_zoo_lists_every_model():
    assert sorted(zoo_names()) == sorted(ZOO)
    assert {n for n in ZOO if zoo_kind(n) == "detector"} == {
        "yolov8n", "yolov8s", "yolo11n", "yolo11s", "fasterrcnn_resnet50_fpn"}


def test_unknown_model_lists_known_names():
    with pytest.raises(UnknownModelError) as err:
        build_model("yolov99")
    assert "yolov99" in str(err.value) and "resnet18" in str(err.value) and "yolo11s" in str(err.value)
    assert isinstance(err.value, ModelLoadError)


def test_importing_models_keeps_ultralytics_offline(no_network):
    import ultralytics.utils
    from ultralytics.utils import checks

    assert os.environ["YOLO_OFFLINE"] == "1"
    assert ultralytics.utils.ONLINE is False and checks.AUTOINSTALL is False
    assert not no_network


def test_detector_predicts_boxes_in_frame_pixels(yolo, no_network):
    assert yolo.kind == "detector" and yolo.is_torch and isinstance(yolo.module, torch.nn.Module)
    assert yolo.class_names == list(COCO_NAMES) and yolo.input_size == 640
    yolo.min_score = 1e-4  # random weights: keep their faint boxes to check the geometry
    try:
        images = [frame(96, 160, 1), frame(120, 80, 2)]
        outputs = yolo.predict(images)
    finally:
        yolo.min_score = 0.25
    assert len(outputs) == 2
    for img, det in zip(images, outputs):
        assert isinstance(det, Detections)
        n = len(det)
        assert det.boxes.shape == (n, 4) and det.boxes.dtype == np.float32
        assert det.scores.shape == (n,) and det.class_ids.shape == (n,)
        if n:
            h, w = img.shape[:2]
            assert det.boxes[:, [0, 2]].max() <= w and det.boxes[:, [1, 3]].max() <= h
            assert det.boxes.min() >= 0 and det.class_ids.max() < 80
    assert yolo.predict([]) == []
    assert not no_network


def test_predict_rejects_non_bgr_frames(yolo):
    with pytest.raises(ValueError, match=r"images\[1\]"):
        yolo.predict([frame(), frame().astype(np.float32)])


def test_classifier_predicts_probabilities(mobilenet):
    assert mobilenet.kind == "classifier" and mobilenet.input_size == 224
    assert len(mobilenet.class_names) == 1000 and mobilenet.class_names[0] == "tench"
    outputs = mobilenet.predict([frame(seed=i) for i in range(3)])
    assert len(outputs) == 3
    for out in outputs:
        assert isinstance(out, ClassProbs) and out.probs.shape == (1000,)
        assert out.probs.sum() == pytest.approx(1.0, abs=1e-4)
        assert 0 <= out.top1 < 1000 and out.top1_prob == pytest.approx(out.probs.max())


def test_letterbox_maps_boxes_back_to_frame():
    img = frame(90, 160)
    tensor, boxes = letterbox_batch([img, img], size=320, stride=32)
    assert tensor.shape == (2, 3, 192, 320)  # 180 rows scaled, padded to a stride multiple
    lb = boxes[0]
    in_net = np.array([[lb.pad_x + 20 * lb.gain, lb.pad_y + 10 * lb.gain,
                        lb.pad_x + 100 * lb.gain, lb.pad_y + 50 * lb.gain]], np.float32)
    np.testing.assert_allclose(lb.boxes_to_image(in_net, (90, 160)), [[20, 10, 100, 50]], atol=0.5)
    mixed, _ = letterbox_batch([img, frame(50, 50)], size=320)
    assert mixed.shape == (2, 3, 320, 320)


def test_torchvision_detector_maps_coco91_labels_to_80():
    class FixedOutput(torch.nn.Module):
        def forward(self, images):
            return [{"boxes": torch.tensor([[1.0, 2, 30, 40], [5, 5, 9, 9], [0, 0, 4, 4]]),
                     "scores": torch.tensor([0.9, 0.8, 0.1]),
                     "labels": torch.tensor([3, 12, 1])}  # car, an unused id, person (low score)
                    for _ in images]

    det = TorchvisionDetector("fake", FixedOutput(), list(COCO_NAMES), 800, None, torch.device("cpu"))
    [out] = det.predict([frame()])
    assert [COCO_NAMES[c] for c in out.class_ids] == ["car"]
    assert COCO91_TO_80[1] == 0 and COCO91_TO_80[90] == 79 and COCO91_TO_80.count(-1) == 11


def test_resolve_device(monkeypatch, caplog):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="edgeva.models.device"):
        assert resolve_device("auto") == torch.device("cpu")
        assert resolve_device("cuda:1") == torch.device("cpu")
    assert "CUDA is not available" in caplog.text
    with pytest.raises(ValueError, match="tpu"):
        resolve_device("tpu")


# ------------------------------------------------------------------ weights

def test_torchvision_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    original = torchvision.models.resnet18(weights=None).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        expected = original(x)
    bare, wrapped = tmp_path / "resnet18.pth", tmp_path / "resnet18_ckpt.pt"
    torch.save(original.state_dict(), bare)
    torch.save({"epoch": 3, "state_dict": original.state_dict()}, wrapped)
    for path in (bare, wrapped):
        model = build_model("resnet18", weights=str(path))
        assert model.weights == str(path) and model.class_names[0] == "tench"
        with torch.inference_mode():
            torch.testing.assert_close(model.module(x), expected)
    img = frame(60, 80)
    reference = build_model("resnet18")
    reference.module.load_state_dict(original.state_dict())
    np.testing.assert_allclose(model.predict([img])[0].probs, reference.predict([img])[0].probs, atol=1e-6)


def test_fine_tuned_head_and_names_come_from_the_checkpoint(tmp_path):
    net = torchvision.models.mobilenet_v3_small(weights=None, num_classes=2)
    path = tmp_path / "gate.pt"
    torch.save({"model": net.state_dict(), "class_names": ["closed", "open"]}, path)
    model = build_model("mobilenet_v3_small", weights=str(path))
    assert model.class_names == ["closed", "open"]
    assert model.predict([frame()])[0].probs.shape == (2,)


def _save_ultralytics_checkpoint(module: torch.nn.Module, path: Path) -> None:
    # The layout ultralytics writes and reads: the model object itself under "model".
    torch.save({"model": module, "train_args": {}, "date": None, "version": "test"}, path)


def test_ultralytics_checkpoint_round_trip(yolo, tmp_path):
    path = tmp_path / "yolov8n_trained.pt"
    _save_ultralytics_checkpoint(yolo.module, path)
    loaded = build_model("yolov8n", weights=str(path))
    assert loaded.is_torch and loaded.weights == str(path) and loaded.class_names == list(COCO_NAMES)
    x = torch.rand(1, 3, 64, 96)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.module(x)[0], yolo.module(x)[0])
    images = [frame(96, 160, 5)]
    yolo.min_score = loaded.min_score = 1e-4
    try:
        a, b = yolo.predict(images)[0], loaded.predict(images)[0]
    finally:
        yolo.min_score = 0.25
    np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
    np.testing.assert_array_equal(a.class_ids, b.class_ids)


def test_missing_weights_file_is_named():
    for name in ("resnet18", "yolov8n"):
        with pytest.raises(ModelLoadError, match="nope/missing.pt does not exist"):
            build_model(name, weights="nope/missing.pt")


def test_garbage_weights_file_is_named(tmp_path):
    for i, content in enumerate((b"\x00\x01 definitely not a checkpoint" * 50, b"this is not a checkpoint", b"")):
        garbage = tmp_path / f"garbage{i}.pt"
        garbage.write_bytes(content)
        for name in ("resnet18", "yolov8n"):
            with pytest.raises(ModelLoadError) as err:
                build_model(name, weights=str(garbage))
            assert str(garbage) in str(err.value) and "checkpoint" in str(err.value)
            assert err.value.path == str(garbage)


def test_wrong_architecture_names_mismatching_keys(tmp_path):
    path = tmp_path / "mnv3.pth"
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), path)
    with pytest.raises(ModelLoadError) as err:
        build_model("resnet18", weights=str(path))
    message = str(err.value)
    assert str(path) in message and "does not fit resnet18" in message
    assert "missing" in message and "conv1.weight" in message


def test_shape_mismatch_is_listed(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    path = tmp_path / "bent.pth"
    torch.save(state, path)
    with pytest.raises(ModelLoadError, match=r"shape mismatch.*layer1\.0\.conv1\.weight \(64, 64, 1, 1\)"):
        build_model("resnet18", weights=str(path))


def test_pickled_module_is_refused_not_executed(tmp_path):
    path = tmp_path / "whole_model.pt"
    torch.save(torchvision.models.mobilenet_v3_small(weights=None), path)
    with pytest.raises(ModelLoadError, match="pickled Python objects"):
        build_model("mobilenet_v3_small", weights=str(path))


def test_yolo_checkpoint_of_another_architecture(yolo, tmp_path):
    path = tmp_path / "v8n.pt"
    _save_ultralytics_checkpoint(yolo.module, path)
    with pytest.raises(ModelLoadError, match=r"v8n\.pt does not fit yolo11n"):
        build_model("yolo11n", weights=str(path))


def test_export_directory_without_metadata(tmp_path):
    with pytest.raises(ModelLoadError, match="metadata.yaml"):
        build_model("yolov8n", weights=str(tmp_path))


def test_downloads_fail_clearly_offline(tmp_path, monkeypatch, no_network):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="could not download torchvision weights"):
        build_model("resnet18", download=True)
    with pytest.raises(ModelLoadError, match="could not download ultralytics weights 'yolov8n.pt'"):
        build_model("yolov8n", download=True)
    assert time.monotonic() - started < 30
    assert no_network  # it did try: download=True is the one path allowed to
    assert os.environ["YOLO_OFFLINE"] == "1"  # restored after the download attempt


def test_without_download_a_bare_name_is_not_fetched(no_network):
    with pytest.raises(ModelLoadError, match="does not exist"):
        build_model("yolov8n", weights="yolov8n.pt")
    assert not no_network


@pytest.mark.slow
def test_every_zoo_model_constructs():
    for name in ZOO:
        model = build_model(name)
        assert model.kind == zoo_kind(name) and model.is_torch
        assert len(model.class_names) == (80 if model.kind == "detector" else 1000)
        del model


@pytest.mark.shared
@pytest.mark.skipif(not (SHARED_WEIGHTS / "yolov8n_int8_openvino_model").is_dir() or not TUNE_VIDEO.exists(),
                    reason="needs ../shared weights and videos")
@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino is not installed")
def test_count_cars_with_real_openvino_detector(no_network):
    import cv2

    capture = cv2.VideoCapture(str(TUNE_VIDEO))
    capture.set(cv2.CAP_PROP_POS_FRAMES, 100)
    ok, image = capture.read()
    capture.release()
    assert ok
    model = build_model("yolov8n", weights=str(SHARED_WEIGHTS / "yolov8n_int8_openvino_model"))
    assert not model.is_torch and model.module is None and model.class_names[2] == "car"
    task = build_task(TaskConfig(type="count", classes=["car"], confidence=0.3), model, "cars")
    assert task.value(model.predict([image])[0])["car"] >= 1
    assert not no_network


# ------------------------------------------------------------------ tasks

def dets(rows: list[tuple[float, float, float, float, float, int]]) -> Detections:
    arr = np.asarray(rows, np.float32).reshape(-1, 6)
    return Detections(arr[:, :4].copy(), arr[:, 4].copy(), arr[:, 5].astype(np.int64))


CAR, PERSON, TRUCK = COCO_NAMES.index("car"), COCO_NAMES.index("person"), COCO_NAMES.index("truck")


def test_count_task_counts_confident_objects_of_its_classes():
    task = build_task(TaskConfig(type="count", classes=["car", TRUCK], confidence=0.5), fake_detector(), "q")
    out = dets([(0, 0, 5, 5, 0.9, CAR), (1, 1, 6, 6, 0.6, CAR), (0, 0, 9, 9, 0.4, CAR),
                (2, 2, 8, 8, 0.9, PERSON), (3, 3, 9, 9, 0.7, TRUCK)])
    assert task.value(out) == {"car": 2, "truck": 1}
    assert task.value(Detections.empty()) == {"car": 0, "truck": 0}


def test_count_agreement():
    assert CountTask.agreement({"car": 0}, {"car": 0}) == 1.0
    assert CountTask.agreement({"car": 4}, {"car": 4}) == 1.0
    assert CountTask.agreement({"car": 3}, {"car": 4}) == pytest.approx(0.75)
    assert CountTask.agreement({"car": 0}, {"car": 2}) == 0.0
    assert CountTask.agreement({"car": 2, "bus": 0}, {"car": 1, "bus": 0}) == pytest.approx(0.5)
    # Classes absent from both results cannot inflate the score.
    assert CountTask.agreement({"car": 5, "bus": 0, "truck": 0}, {"car": 0, "bus": 0, "truck": 0}) == 0.0
    # A car read as a truck agrees on nothing.
    assert CountTask.agreement({"car": 1, "truck": 0}, {"car": 0, "truck": 1}) == 0.0
    assert CountTask.agreement({"car": 3, "bus": 1}, {"car": 2, "bus": 1}) == pytest.approx(0.75)
    assert CountTask.agreement({}, {}) == 1.0


def test_detect_task_value_and_filters():
    task = build_task(TaskConfig(type="detect", classes=["car"], confidence=0.5), fake_detector(), "q")
    out = dets([(10, 20, 30, 40, 0.91234, CAR), (0, 0, 5, 5, 0.3, CAR), (0, 0, 5, 5, 0.9, PERSON)])
    assert task.value(out) == [[10.0, 20.0, 30.0, 40.0, 0.912, "car"]]
    everything = build_task(TaskConfig(type="detect", confidence=0.5), fake_detector(), "q")
    assert len(everything.value(out)) == 2


def test_detect_agreement_is_f1_at_iou_half():
    car = [0, 0, 10, 10, 0.9, "car"]
    shifted = [2, 0, 12, 10, 0.8, "car"]      # IoU 8/12 = 0.67: a match
    far = [6, 0, 16, 10, 0.8, "car"]          # IoU 4/16 = 0.25: no match
    person = [0, 0, 10, 10, 0.9, "person"]
    assert DetectTask.agreement([], []) == 1.0
    assert DetectTask.agreement([car], []) == 0.0 and DetectTask.agreement([], [car]) == 0.0
    assert DetectTask.agreement([car], [shifted]) == 1.0
    assert DetectTask.agreement([car], [far]) == 0.0
    assert DetectTask.agreement([car], [person]) == 0.0
    assert DetectTask.agreement([car, far], [shifted]) == pytest.approx(2 / 3)
    # One-to-one: two predictions on one reference box count once.
    assert DetectTask.agreement([car, shifted], [car]) == pytest.approx(2 / 3)
    # Greedy by IoU: the exact pair is matched first, leaving the other pair to match too.
    a = [[0, 0, 10, 10, 0.9, "car"], [3, 0, 13, 10, 0.9, "car"]]
    b = [[1, 0, 11, 10, 0.9, "car"], [3, 0, 13, 10, 0.9, "car"]]
    assert DetectTask.agreement(a, b) == 1.0


def test_presence_task_for_detectors_and_classifiers():
    det_task = build_task(TaskConfig(type="presence", classes=["person"], confidence=0.5), fake_detector(), "q")
    assert det_task.value(dets([(0, 0, 1, 1, 0.6, PERSON)])) is True
    assert det_task.value(dets([(0, 0, 1, 1, 0.4, PERSON), (0, 0, 1, 1, 0.9, CAR)])) is False
    cls_task = build_task(TaskConfig(type="presence", classes=["dog", 2], confidence=0.5), fake_classifier(), "q")
    assert cls_task.value(ClassProbs(np.array([0.4, 0.35, 0.25], np.float32))) is True   # summed 0.6
    assert cls_task.value(ClassProbs(np.array([0.6, 0.2, 0.2], np.float32))) is False
    low = build_task(TaskConfig(type="presence", classes=["dog"], confidence=0.9), fake_classifier(), "q")
    assert low.value(ClassProbs(np.array([0.3, 0.45, 0.25], np.float32))) is True        # top-1
    assert PresenceTask.agreement(True, True) == 1.0 and PresenceTask.agreement(True, False) == 0.0


def test_classify_task():
    task = build_task(TaskConfig(type="classify"), fake_classifier(), "q")
    assert task.value(ClassProbs(np.array([0.2, 0.7, 0.1], np.float32))) == {"label": "dog", "prob": 0.7}
    narrowed = build_task(TaskConfig(type="classify", classes=["cat", "bird"]), fake_classifier(), "q")
    assert narrowed.value(ClassProbs(np.array([0.2, 0.7, 0.1], np.float32)))["label"] == "other"
    assert narrowed.value(ClassProbs(np.array([0.5, 0.2, 0.3], np.float32)))["label"] == "cat"
    assert ClassifyTask.agreement({"label": "dog", "prob": 0.7}, {"label": "dog", "prob": 0.4}) == 1.0
    assert ClassifyTask.agreement({"label": "dog"}, {"label": "cat"}) == 0.0


def test_passthrough_task_needs_no_model():
    task = build_task(TaskConfig(type="passthrough"), None, "q")
    assert task.value(np.full((4, 4, 3), 10, np.uint8)) == {"mean": 10.0}
    assert PassthroughTask.agreement({"mean": 10.0}, {"mean": 10.0}) == 1.0
    assert PassthroughTask.agreement({"mean": 0.0}, {"mean": 255.0}) == 0.0


def test_task_validation_names_class_and_query():
    with pytest.raises(TaskError, match=r"query 'cars-cam3': class 'carr' is not a class of fakedet.*'car'"):
        build_task(TaskConfig(type="count", classes=["carr"]), fake_detector(), "cars-cam3")
    with pytest.raises(TaskError, match="index 80 is out of range"):
        build_task(TaskConfig(type="count", classes=[80]), fake_detector(), "q")
    with pytest.raises(TaskError, match="needs a detector; fakecls is a classifier"):
        build_task(TaskConfig(type="count", classes=["cat"]), fake_classifier(), "q")
    with pytest.raises(TaskError, match="needs a classifier"):
        build_task(TaskConfig(type="classify"), fake_detector(), "q")
    with pytest.raises(TaskError, match="needs a model"):
        build_task(TaskConfig(type="detect"), None, "q")


def test_class_names_accept_case_aliases_and_ids():
    task = build_task(TaskConfig(type="count", classes=["Car", "motorbike", 0, "car"]), fake_detector(), "q")
    assert task.class_ids == [CAR, COCO_NAMES.index("motorcycle"), 0]


def test_low_confidence_task_lowers_the_detector_score_floor():
    model = fake_detector()
    model.min_score = 0.25
    build_task(TaskConfig(type="count", classes=["car"], confidence=0.5), model, "q")
    assert model.min_score == 0.25
    build_task(TaskConfig(type="count", classes=["car"], confidence=0.1), model, "q")
    assert model.min_score == 0.1


def test_task_rejects_wrong_output_type():
    task = build_task(TaskConfig(type="count", classes=["car"]), fake_detector(), "q")
    with pytest.raises(TypeError, match="count task expects Detections"):
        task.value(ClassProbs(np.ones(3, np.float32) / 3))
