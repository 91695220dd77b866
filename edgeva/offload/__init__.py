"""Offloading inference to other tiers over ZeroMQ (see protocol.py for the wire format).

Daemon side: `OffloadClient` (one tier) and `TierGroup` (several) hand out `OffloadPort`s with
ModelWorker's surface. Worker side: `python -m edgeva.offload.worker` (`worker_main`).
Keys: `keys_main` (`edgeva keys`). Split execution of classifiers: `split.SplitModel`.
"""
from edgeva.offload.client import (CallbackThread, Fallback, OffloadClient, OffloadPort, TierGroup, TierState,
                                   drop_fallback, local_fallback)
from edgeva.offload.keys import keys_main
from edgeva.offload.protocol import FrameEncoding, ModelKey, ProtocolError


def worker_main(argv=None) -> int:  # imported lazily: the worker pulls in torch only when serving
    from edgeva.offload.worker import worker_main as main

    return main(argv)


__all__ = ["CallbackThread", "Fallback", "FrameEncoding", "ModelKey", "OffloadClient", "OffloadPort",
           "ProtocolError", "TierGroup", "TierState", "drop_fallback", "keys_main", "local_fallback",
           "worker_main"]
