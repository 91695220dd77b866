"""Reading a torch state dict from a file and fitting it to a module, with errors that say
which file is wrong and how."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .errors import ModelLoadError

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "weights")
_NAME_KEYS = ("class_names", "names", "classes", "categories")


def existing_file(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"weights file {p} does not exist", path=str(p))
    return p


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """The tensors of a .pt/.pth file and the class names stored beside them, if any.

    Accepts a bare state dict or a checkpoint dict holding one under 'state_dict',
    'model_state_dict', 'model' or 'weights'. Loaded with weights_only=True: a state dict
    never needs arbitrary pickled objects, so a file that does is refused, not executed.
    """
    p = existing_file(path)
    if p.is_dir():
        raise ModelLoadError(f"weights {p} is a directory; expected a .pt/.pth state dict file", path=str(p))
    try:
        obj: Any = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        global_at = text.find("Unsupported global:")
        if global_at >= 0:
            what = text[global_at:].splitlines()[0].split(" was not an allowed")[0].strip()
            raise ModelLoadError(f"weights file {p} holds pickled Python objects, not just tensors "
                                 f"({what}); save model.state_dict() instead", path=str(p)) from None
        detail = text.split("WeightsUnpickler error:")[-1].strip().splitlines()[0] if text.strip() else ""
        raise ModelLoadError(f"weights file {p} is not a PyTorch checkpoint ({detail or 'unreadable pickle'})",
                             path=str(p)) from None
    except Exception as exc:  # garbage bytes surface as any of IndexError, KeyError, EOFError...
        raise ModelLoadError(f"weights file {p} is not a PyTorch checkpoint "
                             f"({type(exc).__name__}: {_short(exc)})", path=str(p)) from None

    names = None
    if isinstance(obj, Mapping):
        for key in _NAME_KEYS:
            if key in obj and _is_name_list(obj[key]):
                names = [str(n) for n in (obj[key].values() if isinstance(obj[key], Mapping) else obj[key])]
                break
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ModelLoadError(f"weights file {p} is not a state dict (found {type(obj).__name__})", path=str(p))
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ModelLoadError(f"weights file {p} is not a state dict: entries {_few(not_tensors)} "
                             f"are not tensors", path=str(p))
    state = {_strip_wrapper_prefix(str(k)): v for k, v in obj.items()}
    return state, names


def load_into(module: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path, model_name: str) -> None:
    """Strict load, but first a readable account of what does not fit."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    if mismatched:
        problems.append(f"shape mismatch (file vs {model_name}) in {len(mismatched)} tensors: {_few(mismatched)}")
    if missing:
        problems.append(f"{len(missing)} tensors missing: {_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors: {_few(unexpected)}")
    if problems:
        raise ModelLoadError(f"weights file {path} does not fit {model_name}: " + "; ".join(problems)
                             + " (wrong architecture?)", path=str(path))
    module.load_state_dict(state, strict=True)


def _strip_wrapper_prefix(key: str) -> str:
    # DataParallel / DistributedDataParallel save keys as "module.<name>".
    return key[len("module."):] if key.startswith("module.") else key


def _is_name_list(value: Any) -> bool:
    items = list(value.values()) if isinstance(value, Mapping) else value
    return isinstance(items, (list, tuple)) and bool(items) and all(isinstance(n, (str, int)) for n in items)


def _few(items: list[str], n: int = 3) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + "..."
