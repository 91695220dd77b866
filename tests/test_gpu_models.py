"""Inference on the device: preprocessing as torch ops (checked against the OpenCV path on the
CPU), the per-model precision check, and (`cuda`) models on CUDA against the same models on
the CPU."""
from __future__ import annotations

import copy

import cv2
import numpy as np
import pytest
import torch

from edgeva.models import build_model
from edgeva.models.outputs import ClassProbs, Detections
from edgeva.models.precision import calibration_frames, choose_precision, output_agreement
from edgeva.models.preprocess import (IMAGENET_STD, letterbox_batch, letterbox_tensor, resize_normalise,
                                      resize_normalise_tensor)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ONE_LEVEL = 1.0 / 255 + 1e-6


def clip_frames(path, sizes) -> list[list[np.ndarray]]:
    cap = cv2.VideoCapture(str(path))
    frames = [cap.read()[1] for _ in range(3)]
    cap.release()
    assert all(f is not None for f in frames)
    return [[cv2.resize(f, size) for f in frames] for size in sizes]


SIZES = [(1280, 720), (640, 360), (200, 150), (300, 200), (223, 225), (160, 120)]


def test_letterbox_on_torch_matches_the_opencv_path(small_clip):
    for frames in clip_frames(small_clip, SIZES) + [calibration_frames(2)]:
        expected, expected_boxes = letterbox_batch(frames, 640, 32)
        got, boxes = letterbox_tensor(frames, 640, 32, "cpu")
        assert got.shape == expected.shape and got.dtype == torch.float32
        assert boxes == expected_boxes
        diff = (got - expected).abs()
        assert diff.max() <= ONE_LEVEL and diff.mean() < 0.5 / 255, frames[0].shape


def test_letterbox_of_mixed_shapes_pads_to_the_square():
    frames = [np.full((120, 160, 3), 30, np.uint8), np.full((200, 100, 3), 220, np.uint8)]
    expected, expected_boxes = letterbox_batch(frames, 320)
    got, boxes = letterbox_tensor(frames, 320)
    assert got.shape == expected.shape == (2, 3, 320, 320) and boxes == expected_boxes
    assert (got - expected).abs().max() <= ONE_LEVEL


def test_resize_normalise_on_torch_matches_opencv_inter_area(small_clip):
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for frames in clip_frames(small_clip, SIZES):
        expected = resize_normalise(frames, 224)
        got = resize_normalise_tensor(frames, 224, "cpu")
        assert got.shape == expected.shape
        levels = ((got - expected) * std).abs()       # back to [0, 1] pixel units
        assert levels.max() <= ONE_LEVEL and levels.mean() < 0.25 / 255, frames[0].shape


def test_output_agreement_compares_like_the_tasks():
    a = Detections(np.array([[0, 0, 10, 10], [20, 20, 40, 40]], np.float32), np.array([0.9, 0.8], np.float32),
                   np.array([2, 0]))
    shifted = Detections(a.boxes + 1, a.scores, a.class_ids)
    other_class = Detections(a.boxes, a.scores, np.array([2, 5]))
    assert output_agreement([a], [shifted]) == 1.0
    assert output_agreement([a], [other_class]) == 0.5
    assert output_agreement([Detections.empty()], [Detections.empty()]) == 1.0
    p, q = ClassProbs(np.array([0.7, 0.3], np.float32)), ClassProbs(np.array([0.4, 0.6], np.float32))
    assert output_agreement([p, p], [p, q]) == 0.5


def test_precision_check_keeps_bf16_only_when_it_agrees_and_reports_why():
    torch.manual_seed(0)
    model = build_model("mobilenet_v3_small")
    frames = calibration_frames(2, (120, 160))
    reference = model.predict(frames)

    kept = choose_precision(model, "bf16", min_agreement=0.0, frames=frames)
    assert kept.chosen == "bf16" and model.autocast_dtype is torch.bfloat16 and kept.frames == 2
    assert 0.0 <= kept.agreement <= 1.0 and model.precision is kept
    reduced = model.predict(frames)
    assert all(np.isfinite(r.probs).all() for r in reduced)

    refused = choose_precision(model, "bf16", min_agreement=1.01, frames=frames)
    assert refused.chosen == "fp32" and model.autocast_dtype is None and "stays float32" in refused.reason
    assert all(np.allclose(a.probs, b.probs) for a, b in zip(reference, model.predict(frames)))

    auto = choose_precision(model, "auto", frames=frames)
    assert auto.chosen == "fp32" and auto.agreement is None and "no CUDA" in auto.reason
    with pytest.raises(ValueError):
        choose_precision(model, "fp8")


def test_precision_check_runs_predictions_through_the_given_runner():
    model = build_model("mobilenet_v3_small")
    calls = []

    def run(fn):
        calls.append(1)
        return fn()

    choose_precision(model, "bf16", min_agreement=0.0, frames=calibration_frames(1, (64, 64)), run=run)
    assert len(calls) == 2


def test_build_model_on_the_host_names_the_device_it_will_run_on():
    model = build_model("resnet18", device="cpu", place=False)
    assert model.device == torch.device("cpu") and model.on_device()
    assert not model.channels_last        # NHWC only where cuDNN profits from it


# ---------------------------------------------------------------------------- on a GPU

@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v3_large", "yolov8n"])
def test_cuda_models_match_their_cpu_outputs(name):
    torch.manual_seed(0)
    cpu_model = build_model(name)
    gpu_model = copy.deepcopy(cpu_model)
    gpu_model.device = torch.device("cuda:0")
    gpu_model.place()
    assert gpu_model.on_device()
    frames = calibration_frames(4)
    if cpu_model.kind == "classifier":
        for a, b in zip(cpu_model.predict(frames), gpu_model.predict(frames)):
            assert np.abs(a.probs - b.probs).max() < 2e-3
            # Random weights give near-uniform probabilities: a tie may break either way.
            assert a.top1 == b.top1 or abs(a.probs[a.top1] - a.probs[b.top1]) < 1e-3
    else:
        from edgeva.models.preprocess import letterbox_batch
        x, _ = letterbox_batch(frames, 640)
        with torch.inference_mode():
            ref = cpu_model.module(x)[0]
            got = gpu_model.module(gpu_model.input_layout(x.cuda()))[0].float().cpu()
        assert ((got - ref).abs().mean() / ref.abs().mean()) < 1e-2
        assert output_agreement(cpu_model.predict(frames), gpu_model.predict(frames)) >= 0.9


@needs_cuda
@pytest.mark.cuda
def test_cuda_preprocessing_matches_the_cpu_path():
    frames = [cv2.resize(f, (1280, 720)) for f in calibration_frames(3)]
    x_cpu, boxes_cpu = letterbox_batch(frames, 640)
    x_gpu, boxes_gpu = letterbox_tensor(frames, 640, 32, "cuda:0")
    assert x_gpu.is_cuda and boxes_gpu == boxes_cpu
    assert (x_gpu.cpu() - x_cpu).abs().max() <= ONE_LEVEL
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    r_gpu = resize_normalise_tensor(frames, 224, "cuda:0").cpu()
    assert (((r_gpu - resize_normalise(frames, 224)) * std).abs().max()) <= ONE_LEVEL


@needs_cuda
@pytest.mark.cuda
def test_cuda_fp16_is_checked_against_fp32_and_reported():
    torch.manual_seed(0)
    model = build_model("resnet50", device="cuda:0")
    choice = choose_precision(model, "auto")
    assert choice.chosen in ("fp16", "fp32") and choice.agreement is not None
    assert (model.autocast_dtype is torch.float16) == (choice.chosen == "fp16")
