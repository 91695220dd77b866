"""Keeping third-party libraries off the network unless a query asks for a download.

ultralytics reaches out on its own in several places:
- at import it resolves DNS names to decide `ONLINE` (a hang on a network that drops packets);
- `attempt_download_asset` fetches any missing `*.pt` name from GitHub;
- `check_requirements` pip-installs missing packages (e.g. an export's runtime);
- `check_font` downloads Arial.ttf when results are plotted (edgeva never plots);
- `check_amp` downloads yolo26n.pt when training on CUDA (edgeva never trains through it);
- telemetry events and pip-update checks when `ONLINE` and `settings.sync`.
`YOLO_OFFLINE=1` makes `is_online()` False without a DNS lookup (downloads then fail fast,
events and update checks stay off) and `YOLO_AUTOINSTALL=false` stops pip installs. They
must be in the environment before ultralytics is first imported; if it already is, the
module-level copies are patched too. `allow_downloads()` lifts YOLO_OFFLINE for the
duration of an explicit `download: true` build.

torchvision downloads only when asked for named weights, which edgeva does only with
`download: true`; `network_timeout()` bounds such a download on a network that drops packets.
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys
from typing import Iterator

_ENV_DEFAULTS = {
    "YOLO_OFFLINE": "1",
    "YOLO_AUTOINSTALL": "false",
    "YOLO_VERBOSE": "false",
}


def make_ultralytics_offline_safe() -> None:
    """Idempotent; an explicit value already in the environment wins."""
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if "ultralytics.utils" in sys.modules and os.environ["YOLO_OFFLINE"] not in ("0", "false", "False"):
        _patch_imported_ultralytics()


def _patch_imported_ultralytics() -> None:
    for mod_name in ("ultralytics.utils", "ultralytics.utils.checks", "ultralytics.utils.events"):
        mod = sys.modules.get(mod_name)
        if mod is None:
            continue
        if hasattr(mod, "ONLINE"):
            mod.ONLINE = False
        if hasattr(mod, "AUTOINSTALL"):
            mod.AUTOINSTALL = False
    events = getattr(sys.modules.get("ultralytics.utils.events"), "events", None)
    if events is not None:
        events.enabled = False


def import_ultralytics():  # -> the ultralytics module
    make_ultralytics_offline_safe()
    import ultralytics

    return ultralytics


@contextlib.contextmanager
def allow_downloads(timeout_s: float = 60.0) -> Iterator[None]:
    """Let a library fetch named weights for the duration of the block."""
    previous = os.environ.pop("YOLO_OFFLINE", None)
    try:
        with network_timeout(timeout_s):
            yield
    finally:
        if previous is not None:
            os.environ["YOLO_OFFLINE"] = previous


@contextlib.contextmanager
def network_timeout(timeout_s: float) -> Iterator[None]:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)
