"""Choosing a camera's decoder: OpenCV (FFmpeg on the CPU) or NVIDIA's hardware decoder.

`decode: auto | cpu | cuda` per camera. `auto` uses NVDEC when a CUDA device and a reader for it
are present (torchcodec's CUDA decoder for files; NVIDIA's PyNvVideoCodec for files and
streams), else OpenCV; `cuda` asks for NVDEC and falls back to OpenCV with a warning that says
why. USB devices deliver raw frames, so there is nothing to decode on the GPU. The choice is a
pure function (`choose_decoder`) so every branch is tested without a GPU; a hardware reader
that fails to open also falls back to OpenCV, with the reason logged.

A hardware reader offers the part of cv2.VideoCapture the camera reader uses (`isOpened`,
`read`, `get(CAP_PROP_FPS)`, `release`). Frames come back to the host as BGR uint8, because the
frame-difference filter and the offload encoder work on host arrays; decoding still leaves the
CPU, which is what costs most at 1080p.
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import cv2
import numpy as np

log = logging.getLogger("edgeva.decode")

DECODE_MODES = ("auto", "cpu", "cuda")
OPENCV = "opencv"
TORCHCODEC = "torchcodec-cuda"
PYNVVIDEOCODEC = "pynvvideocodec"


@dataclass(frozen=True)
class DecoderChoice:
    kind: str            # opencv | torchcodec-cuda | pynvvideocodec
    reason: str
    fallback: bool = False   # NVDEC was asked for (decode: cuda) and is not used


def available_nvdec_readers() -> tuple[str, ...]:
    """Hardware readers whose package is installed (importability only; no CUDA call)."""
    found = []
    if importlib.util.find_spec("torchcodec") is not None:
        found.append(TORCHCODEC)
    if importlib.util.find_spec("PyNvVideoCodec") is not None:
        found.append(PYNVVIDEOCODEC)
    return tuple(found)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def choose_decoder(mode: str, source_kind: str, *, cuda: bool, readers: tuple[str, ...]) -> DecoderChoice:
    """The decoder for a camera: `mode` from its config, `source_kind` file | stream | usb."""
    if mode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {mode!r}")
    asked = mode == "cuda"
    if mode == "cpu":
        return DecoderChoice(OPENCV, "decode: cpu")
    if source_kind == "usb":
        return DecoderChoice(OPENCV, "a USB device delivers raw frames: nothing to decode on the GPU", asked)
    if not cuda:
        return DecoderChoice(OPENCV, "no CUDA device", asked)
    usable = [r for r in readers if r == PYNVVIDEOCODEC or source_kind == "file"]
    if not usable:
        missing = ("PyNvVideoCodec (torchcodec reads files only)" if source_kind == "stream"
                   else "torchcodec or PyNvVideoCodec")
        return DecoderChoice(OPENCV, f"no NVDEC reader installed: pip install {missing}", asked)
    return DecoderChoice(usable[0], f"NVDEC through {usable[0]}")


def open_capture(source: str, source_kind: str, mode: str, open_opencv: Callable[[], Any], *,
                 camera: str = "?", gpu: int = 0, cuda: Optional[bool] = None,
                 readers: Optional[tuple[str, ...]] = None) -> tuple[Any, DecoderChoice]:
    """Open the camera with the chosen decoder; a hardware reader that fails falls back to OpenCV."""
    choice = choose_decoder(mode, source_kind, cuda=cuda_available() if cuda is None else cuda,
                            readers=available_nvdec_readers() if readers is None else readers)
    if choice.kind != OPENCV:
        try:
            reader = TorchcodecCapture if choice.kind == TORCHCODEC else PyNvCapture
            return reader(source, gpu), choice
        except Exception as exc:
            choice = DecoderChoice(OPENCV, f"{choice.kind} could not open it ({type(exc).__name__}: {exc})",
                                   fallback=True)
    if choice.fallback or mode == "cuda":
        log.warning("camera %s: decoding on the CPU with OpenCV: %s", camera, choice.reason)
    else:
        log.debug("camera %s: decoder %s (%s)", camera, choice.kind, choice.reason)
    return open_opencv(), choice


class _HardwareCapture:
    """The cv2.VideoCapture surface the camera reader uses, over an indexed GPU decoder."""

    def __init__(self) -> None:
        self._index = 0
        self._fps = 0.0
        self._count = 0
        self._open = True

    def isOpened(self) -> bool:   # noqa: N802 (cv2's name)
        return self._open

    def get(self, prop: int) -> float:
        if prop == cv2.CAP_PROP_FPS:
            return self._fps
        if prop == cv2.CAP_PROP_FRAME_COUNT:
            return float(self._count)
        return 0.0

    def read(self) -> tuple[bool, Optional[np.ndarray]]:
        if not self._open or self._index >= self._count:
            return False, None
        rgb = self._frame(self._index)          # HxWx3 RGB uint8 tensor on the GPU
        self._index += 1
        return True, np.ascontiguousarray(rgb.flip(-1).cpu().numpy())

    def release(self) -> None:
        self._open = False

    def _frame(self, index: int) -> Any:
        raise NotImplementedError


class TorchcodecCapture(_HardwareCapture):
    def __init__(self, path: str, gpu: int = 0):
        super().__init__()
        from torchcodec.decoders import VideoDecoder

        self._decoder = VideoDecoder(path, device=f"cuda:{gpu}", dimension_order="NHWC")
        meta = self._decoder.metadata
        self._fps = float(getattr(meta, "average_fps", None) or 0.0)
        self._count = len(self._decoder)

    def _frame(self, index: int) -> Any:
        return self._decoder[index]


class PyNvCapture(_HardwareCapture):
    def __init__(self, source: str, gpu: int = 0):
        super().__init__()
        import PyNvVideoCodec as nvc

        self._decoder = nvc.SimpleDecoder(source, gpu_id=gpu, use_device_memory=True,
                                          output_color_type=nvc.OutputColorType.RGB)
        meta = self._decoder.get_stream_metadata()
        self._fps = float(getattr(meta, "average_fps", 0.0) or 0.0)
        self._count = len(self._decoder)

    def _frame(self, index: int) -> Any:
        import torch

        return torch.from_dlpack(self._decoder[index])
