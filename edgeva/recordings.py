"""A folder of recordings as one camera source: the video files in it, in name order.

`edgeva run --until-end` over such a camera processes the whole folder as one batch; the
reader plays the files one after another and stamps each frame with its file (`clip`).
Depends on nothing else in edgeva (config validation and the reader both use it).
"""
from __future__ import annotations

import os
from pathlib import Path

import cv2

VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".avi", ".webm", ".ts", ".mts", ".mpg",
                              ".mpeg", ".flv", ".wmv", ".3gp", ".h264", ".h265", ".hevc"})


def list_recordings(folder: str | os.PathLike[str]) -> list[str]:
    """The video files directly in `folder` (by extension, hidden files left out), sorted by name."""
    root = Path(folder)
    return sorted(str(p) for p in root.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in VIDEO_EXTENSIONS)


def frame_count(path: str) -> int | None:
    """The container's frame count (an estimate for some formats), or None when it has none."""
    cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
    try:
        if not cap.isOpened():
            return None
        n = cap.get(cv2.CAP_PROP_FRAME_COUNT)
        return int(n) if n and n > 0 else None
    finally:
        cap.release()


def playable(source: str) -> str:
    """What OpenCV can open for `source`: a folder's first recording (tools that sample one
    camera, like `edgeva tune` and `edgeva merge`), anything else unchanged."""
    if os.path.isdir(source):
        recordings = list_recordings(source)
        if recordings:
            return recordings[0]
    return source
