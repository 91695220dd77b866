"""Decoder choice per camera (`decode: auto|cpu|cuda`): every branch of the choice and the
fallback to OpenCV on the CPU, a camera reading a real clip with `decode: cuda` on a machine
without CUDA, and (`cuda`) NVDEC decoding a clip from ../shared against OpenCV."""
from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
import torch

from edgeva.config import CameraConfig, ConfigError, parse_config
from edgeva.decode import (OPENCV, PYNVVIDEOCODEC, TORCHCODEC, available_nvdec_readers, choose_decoder,
                           open_capture)
from edgeva.sources import CameraReader, FrameBuffer
from edgeva.stats import StatsRegistry

BOTH = (TORCHCODEC, PYNVVIDEOCODEC)


@pytest.mark.parametrize("mode,kind,cuda,readers,expected,fallback,why", [
    ("cpu", "file", True, BOTH, OPENCV, False, "decode: cpu"),
    ("auto", "file", False, BOTH, OPENCV, False, "no CUDA device"),
    ("cuda", "file", False, BOTH, OPENCV, True, "no CUDA device"),
    ("auto", "file", True, (), OPENCV, False, "no NVDEC reader installed"),
    ("cuda", "file", True, (), OPENCV, True, "torchcodec or PyNvVideoCodec"),
    ("auto", "file", True, BOTH, TORCHCODEC, False, "NVDEC"),
    ("auto", "file", True, (PYNVVIDEOCODEC,), PYNVVIDEOCODEC, False, "NVDEC"),
    ("auto", "stream", True, (TORCHCODEC,), OPENCV, False, "PyNvVideoCodec"),
    ("cuda", "stream", True, BOTH, PYNVVIDEOCODEC, False, "NVDEC"),
    ("cuda", "usb", True, BOTH, OPENCV, True, "raw frames"),
])
def test_choice_of_decoder(mode, kind, cuda, readers, expected, fallback, why):
    choice = choose_decoder(mode, kind, cuda=cuda, readers=readers)
    assert (choice.kind, choice.fallback) == (expected, fallback) and why in choice.reason


def test_unknown_mode_is_refused_in_config_and_choice():
    with pytest.raises(ValueError):
        choose_decoder("gpu", "file", cuda=True, readers=BOTH)
    with pytest.raises(ConfigError) as err:
        parse_config({"cameras": [{"id": "c", "source": "a.mp4", "decode": "gpu"}]})
    assert err.value.path == "cameras[0].decode"


def test_a_hardware_reader_that_fails_to_open_falls_back_to_opencv_with_the_reason(small_clip, caplog,
                                                                                   monkeypatch):
    import edgeva.decode

    class NoSession:
        def __init__(self, *args):
            raise RuntimeError("cuvidCreateDecoder failed: out of decoder sessions")

    monkeypatch.setattr(edgeva.decode, "TorchcodecCapture", NoSession)
    opened = []

    def open_opencv():
        opened.append(1)
        return cv2.VideoCapture(str(small_clip))

    with caplog.at_level(logging.WARNING, logger="edgeva.decode"):
        cap, choice = open_capture(str(small_clip), "file", "cuda", open_opencv, camera="c9", cuda=True,
                                   readers=BOTH)
    try:
        assert opened and cap.isOpened() and choice.kind == OPENCV and choice.fallback
        assert "torchcodec-cuda could not open it" in choice.reason and "decoder sessions" in choice.reason
        assert any("c9" in r.getMessage() and "OpenCV" in r.getMessage() for r in caplog.records)
    finally:
        cap.release()


def test_camera_with_decode_cuda_reads_the_clip_with_opencv_without_a_gpu(small_clip):
    if torch.cuda.is_available():
        pytest.skip("this checks the fallback on a machine without CUDA")
    cfg = CameraConfig(id="cam", source=str(small_clip), replay="fast", decode="cuda")
    buffer = FrameBuffer(64)
    reader = CameraReader(cfg, buffer, StatsRegistry())
    reader.start()
    frames = []
    while len(frames) < 50:
        frame = buffer.get(timeout=5)
        assert frame is not None
        frames.append(frame)
    reader.stop()
    assert reader.decoder.kind == OPENCV and reader.decoder.fallback and "no CUDA" in reader.decoder.reason
    assert frames[0].image.shape == (120, 160, 3)


@pytest.mark.cuda
def test_cuda_nvdec_decodes_a_shared_clip_like_opencv(shared_dir):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    readers = [r for r in available_nvdec_readers()]
    if not readers:
        pytest.skip("neither torchcodec nor PyNvVideoCodec is installed")
    clip = sorted((shared_dir / "videos" / "tune").glob("*.mp4"))[0]
    cap, choice = open_capture(str(clip), "file", "cuda", lambda: cv2.VideoCapture(str(clip)), cuda=True)
    assert choice.kind != OPENCV, choice.reason
    reference = cv2.VideoCapture(str(clip))
    diffs = []
    for _ in range(30):
        ok, frame = cap.read()
        ok_ref, ref = reference.read()
        assert ok and ok_ref and frame.shape == ref.shape and frame.dtype == np.uint8
        diffs.append(np.abs(frame.astype(np.int16) - ref.astype(np.int16)).mean())
    cap.release()
    reference.release()
    assert cap.get(cv2.CAP_PROP_FPS) > 0
    assert np.mean(diffs) < 4.0      # colour conversion differs slightly between NVDEC and swscale
