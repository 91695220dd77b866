"""What a camera's `source` string names (a file, a network stream, a USB device) and how
to show it without its password (`edgeva.redaction`). Shared by config validation and the camera readers."""
from __future__ import annotations

import enum
import re
from typing import Optional

from edgeva.redaction import redact   # re-exported: the readers and config show sources through it

STREAM_SCHEMES = ("rtsp", "rtsps", "http", "https", "rtmp", "udp", "tcp")

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_USB = re.compile(r"^(?:usb:)?(\d+)$")


class SourceKind(str, enum.Enum):
    FILE = "file"
    STREAM = "stream"
    USB = "usb"


def classify_source(source: str) -> SourceKind:
    """The kind of a camera's `source` string; ValueError for a scheme we cannot read."""
    text = source.strip()
    if not text:
        raise ValueError("camera source is empty")
    scheme = _SCHEME.match(text)
    if scheme:
        name = scheme.group(1).lower()
        if name in STREAM_SCHEMES:
            return SourceKind.STREAM
        if name == "file":
            return SourceKind.FILE
        raise ValueError(f"unsupported source scheme {name!r} in {redact(text)!r} "
                         f"(supported: {', '.join(STREAM_SCHEMES)}, file paths, /dev/videoN, usb:N or N)")
    if _USB.match(text) or text.startswith("/dev/"):   # /dev/videoN, /dev/v4l/by-id/...
        return SourceKind.USB
    return SourceKind.FILE


def usb_index(source: str) -> Optional[int]:
    """The device number of `usb:N` or `N`; None for a device path such as /dev/video0."""
    match = _USB.match(source.strip())
    return int(match.group(1)) if match else None


