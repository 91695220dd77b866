"""A classifier as a chain of blocks, so a merge step can run only the part of a model that
changed: the activations entering the first changed block are computed once and cached.

Blocks are the module's top-level children, with each `nn.Sequential` child opened one level
(ResNet's layerN -> its residual blocks, VGG's features -> its layers); a flatten goes before
the first block whose first weighted layer is fully connected, as torchvision's forwards do.
The chain is trusted only after it reproduced the module's own forward on a probe input;
otherwise (or for detectors) the whole module is one block.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


@dataclass(frozen=True)
class Block:
    path: str               # module path prefix of every layer inside ("" = the whole model)
    module: nn.Module
    flatten: bool            # flatten to N x features before running it


def _needs_flatten(block: nn.Module) -> bool:
    for m in block.modules():
        if isinstance(m, nn.Linear):
            return True
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm2d)):
            return False
    return False


def _chain(module: nn.Module) -> list[Block]:
    blocks: list[Block] = []
    for name, child in module.named_children():
        parts = list(child.named_children()) if type(child) is nn.Sequential else [("", child)]
        for sub, m in parts:
            blocks.append(Block(f"{name}.{sub}" if sub else name, m, False))
    flattened: list[Block] = []
    done = False
    for b in blocks:
        need = not done and _needs_flatten(b.module)
        done = done or need
        flattened.append(Block(b.path, b.module, need))
    return flattened


class BlockChain:
    """Run a module block by block; `run(x, start)` continues from activations entering `start`."""

    def __init__(self, module: nn.Module, blocks: list[Block]) -> None:
        self.module = module
        self.blocks = blocks

    @classmethod
    def of(cls, module: nn.Module, probe: Optional[torch.Tensor]) -> "BlockChain":
        """The finest chain that reproduces `module(probe)`; one whole-module block otherwise."""
        whole = cls(module, [Block("", module, False)])
        if probe is None:
            return whole
        chain = cls(module, _chain(module))
        if len(chain.blocks) < 2:
            return whole
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                want = module(probe)
                want = getattr(want, "logits", want)
                got = chain.run(probe, 0)
            same = isinstance(want, torch.Tensor) and want.shape == got.shape and torch.allclose(want, got, atol=1e-5)
        except Exception:  # a forward that is not "children in order" may fail any way
            same = False
        finally:
            module.train(was_training)
        return chain if same else whole

    def __len__(self) -> int:
        return len(self.blocks)

    def block_of(self, path: str) -> int:
        """Index of the block holding the layer at `path` (0 when the chain is one block)."""
        for i, b in enumerate(self.blocks):
            if not b.path or path == b.path or path.startswith(b.path + "."):
                return i
        raise KeyError(path)

    def run(self, x: torch.Tensor, start: int = 0, end: Optional[int] = None) -> torch.Tensor:
        for b in self.blocks[start:end]:
            if b.flatten:
                x = torch.flatten(x, 1)
            x = b.module(x)
        return getattr(x, "logits", x)

    def fingerprints(self, salt: str, upto: Optional[int] = None) -> list[str]:
        """fingerprints[b]: content hash of everything blocks [0, b) compute with (and `salt`,
        which names the inputs). Equal hashes, equal activations entering block b."""
        end = len(self.blocks) if upto is None else upto
        h = hashlib.blake2b(salt.encode(), digest_size=16)
        out = [h.hexdigest()]
        for b in self.blocks[:end]:
            h.update(b.path.encode())
            for t in (*b.module.parameters(), *b.module.buffers()):
                h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            out.append(h.hexdigest())
        return out

    def block_names(self) -> list[str]:
        return [b.path or "<whole model>" for b in self.blocks]


class ActivationCache:
    """Activations entering a block, keyed by the content of everything before it (so a cached
    prefix is reused by every model whose prefix is bit-identical, and never after it changed).
    Least recently used entries go first once `max_bytes` is exceeded."""

    def __init__(self, max_bytes: int = 2 * 2**30) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> Optional[torch.Tensor]:
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > 1 and self.nbytes > self.max_bytes:
            self._entries.popitem(last=False)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._entries.values())
