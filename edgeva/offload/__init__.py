"""Offloading inference to other tiers over ZeroMQ (see protocol.py for the wire format).

Daemon side: `OffloadClient` (one tier) and `TierGroup` (several) hand out `OffloadPort`s with
ModelWorker's surface. Worker side: `python -m edgeva.offload.worker` (`worker_main`).
Keys: `keys_main` (`edgeva keys`). Split execution of classifiers: `split.SplitModel`.
"""
from typing import Optional, Sequence

from edgeva.offload.client import (CallbackThread, Fallback, OffloadClient, OffloadPort, TierGroup, TierState,
                                   drop_fallback, local_fallback)
from edgeva.offload.protocol import FrameEncoding, ModelKey, ProtocolError


def keys_main(argv: Optional[Sequence[str]] = None) -> int:
    from edgeva.offload.keys import keys_main as main

    return main(argv)


def worker_main(argv: Optional[Sequence[str]] = None) -> int:
    """Imported on call: the worker pulls in torch only when it serves."""
    from edgeva.offload.worker import worker_main as main

    return main(argv)


__all__ = ["CallbackThread", "Fallback", "FrameEncoding", "ModelKey", "OffloadClient", "OffloadPort",
           "ProtocolError", "TierGroup", "TierState", "drop_fallback", "keys_main", "local_fallback",
           "worker_main"]
