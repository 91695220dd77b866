"""One model of a merge, run the way a merge step needs it: from the first block a step changed,
on inputs prepared once at the model's configured input size.

- held-out inputs per camera and the training inputs with the frozen original's outputs on them
  (the distillation targets) are computed once, before anything changes;
- activations entering a block come from an `ActivationCache` keyed by the content of the blocks
  before it, so a step that changes only layer4 of a ResNet runs (and retrains) layer4 and the
  head, not the whole network, and never reuses activations from a prefix that changed;
- classifiers are evaluated through their chain (softmax of the logits, as `predict` does);
  other models (detectors) through `predict` on the frames, their own post-processing included.
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterable, Optional

import numpy as np
import torch

from ..models.base import ZooModel
from ..models.outputs import ClassProbs
from .blocks import ActivationCache, BlockChain
from .distill import DistillAdapter, TeacherCache

BATCH = 32
PREDICT_BATCH = 16


def frames_digest(frames: list[np.ndarray]) -> str:
    """A content hash of a list of frames (every frame's shape and a strided sample of its pixels)."""
    h = hashlib.blake2b(digest_size=16)
    for f in frames:
        h.update(repr(f.shape).encode())
        h.update(np.ascontiguousarray(f[::7, ::7]).tobytes())
    return h.hexdigest()


class ModelRunner:
    def __init__(self, key: str, model: ZooModel, adapter: Optional[DistillAdapter],
                 heldout: dict[str, list[np.ndarray]], train: list[np.ndarray], cache: ActivationCache) -> None:
        self.key = key
        self.model = model
        self.adapter = adapter
        self.cache = cache
        self.device = model.device
        self.heldout_frames = heldout
        self.train_frames = train
        self.classifier = model.kind == "classifier" and adapter is not None
        probe = adapter.inputs(heldout[next(iter(heldout))][:1]).to(self.device) if self.classifier and heldout else None
        self.chain = BlockChain.of(model.module, probe) if model.module is not None else None
        self.salt = f"{model.name}|{model.input_size}|{type(adapter).__name__}"
        self.heldout_inputs = ({cam: adapter.inputs(frames) for cam, frames in heldout.items()}
                               if self.classifier else {})
        # cached activations are keyed by the frames' content, not their camera's name: two models
        # may hold different frames under one name (each classifier's own choice of probe frames)
        self.heldout_salts = {cam: f"{self.salt}|heldout|{frames_digest(frames)}" for cam, frames in heldout.items()}
        self.train_salt = f"{self.salt}|train|{frames_digest(train)}"
        self.teacher: Optional[TeacherCache] = None
        self._stash: set[int] = set()

    def stash_at(self, blocks: Iterable[int]) -> None:
        """Keep the activations entering these blocks when the whole model runs (set before
        `prepare`, so the originals' pass fills them)."""
        self._stash = {b for b in blocks if self.chain is not None and 0 < b < len(self.chain)}

    def prepare(self) -> None:
        """The frozen original's outputs on the training frames: the distillation targets."""
        if self.adapter is not None and self.train_frames and self.chain is not None:
            inputs = self.adapter.inputs(self.train_frames)
            self.teacher = TeacherCache(inputs, self._forward_stashing(inputs, self.train_salt, self._stash))

    def block_name(self, index: int) -> str:
        if self.chain is None or index >= len(self.chain):
            return "-"
        return self.chain.block_names()[index]

    # -------------------------------------------------------------- forward
    def _forward_stashing(self, inputs: torch.Tensor, salt: str, stash: set[int]) -> torch.Tensor:
        """The chain's output on `inputs`, putting the activations entering each block in `stash`
        into the cache on the way."""
        assert self.chain is not None
        prints = self.chain.fingerprints(salt)
        kept: dict[int, list[torch.Tensor]] = {b: [] for b in stash}
        outs = []
        with torch.no_grad():
            for i in range(0, len(inputs), BATCH):
                x = inputs[i:i + BATCH].to(self.device)
                for b, block in enumerate(self.chain.blocks):
                    if b in kept:
                        kept[b].append(x.cpu())
                    x = self.chain.run(x, b, b + 1)
                outs.append(self.adapter.head(x).cpu())
        for b, parts in kept.items():
            self.cache.put(prints[b], torch.cat(parts))
        return torch.cat(outs)

    def prefix(self, inputs: torch.Tensor, salt: str, start: int) -> torch.Tensor:
        """Activations entering block `start` for `inputs` (computed from the nearest cached
        boundary below it, then cached)."""
        if start == 0 or self.chain is None:
            return inputs
        prints = self.chain.fingerprints(salt, upto=start)
        hit = self.cache.get(prints[start])
        if hit is not None:
            return hit
        base, x_all = 0, inputs
        for b in range(start - 1, 0, -1):
            found = self.cache.get(prints[b])
            if found is not None:
                base, x_all = b, found
                break
        parts = []
        with torch.no_grad():
            for i in range(0, len(x_all), BATCH):
                parts.append(self.chain.run(x_all[i:i + BATCH].to(self.device), base, start).cpu())
        out = torch.cat(parts)
        self.cache.put(prints[start], out)
        return out

    def train_prefix(self, start: int) -> torch.Tensor:
        assert self.teacher is not None
        return self.prefix(self.teacher.inputs, self.train_salt, start)

    def student(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Differentiable output from block `start` (for distillation)."""
        assert self.chain is not None and self.adapter is not None
        self.adapter.ready_for_grad(self.model.module)
        return self.adapter.head(self.chain.run(x.to(self.device), start))

    # -------------------------------------------------------------- values
    def predicted(self, camera: str) -> list[Any]:
        """The model's own `predict` (the path the daemon runs) on the camera's held-out frames."""
        frames = self.heldout_frames[camera]
        return [o for i in range(0, len(frames), PREDICT_BATCH) for o in self.model.predict(frames[i:i + PREDICT_BATCH])]

    def outputs(self, camera: str, start: int = 0) -> list[Any]:
        """The model's outputs (ClassProbs / Detections) on the camera's held-out frames."""
        if not self.classifier or self.chain is None:
            return self.predicted(camera)
        if self.model.module.training:
            self.model.module.eval()
        inputs, salt = self.heldout_inputs[camera], self.heldout_salts[camera]
        if start == 0:
            logits = self._forward_stashing(inputs, salt, self._stash)
        else:
            x_all = self.prefix(inputs, salt, start)
            with torch.no_grad():
                logits = torch.cat([self.chain.run(x_all[i:i + BATCH].to(self.device), start).float().cpu()
                                    for i in range(0, len(x_all), BATCH)])
        return [ClassProbs(p) for p in torch.softmax(logits.float(), dim=1).numpy()]

    def trainable(self, start: int) -> list[torch.nn.Parameter]:
        """Parameters of blocks [start, end): the only ones a step starting there may change."""
        if self.chain is None:
            return []
        return [p for b in self.chain.blocks[start:] for p in b.module.parameters()]

    def start_of(self, paths: Iterable[str]) -> int:
        if self.chain is None:
            return 0
        return min((self.chain.block_of(p) for p in paths), default=len(self.chain))
