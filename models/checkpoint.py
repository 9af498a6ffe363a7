"""Safe, all-or-nothing loading of model weights: the authors' releases and our own training checkpoints."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# Plain numpy scalars (e.g. a saved best accuracy) rebuild without running code from the file; numpy 1
# pickles name the scalar constructor `numpy.core...`, numpy 2 pickles `numpy._core...`.
_SCALAR = np._core.multiarray.scalar
_SAFE_NUMPY = [np.dtype, _SCALAR, (_SCALAR, "numpy.core.multiarray.scalar"),
               *{type(np.dtype(t)) for t in "efdhilqbBHILQ?"}]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message is one line naming the file and the problem."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file with `weights_only=True`: tensors and plain containers only, never code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        with torch.serialization.safe_globals(_SAFE_NUMPY):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "global" in str(e).lower():
            reason = "refused: it needs arbitrary code to unpickle (only tensors and plain data are loaded)"
        raise CheckpointError(f"{path}: {reason}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({first})") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of weights, found {type(obj).__name__}")
    return dict(obj)


def extract_state_dict(ckpt: Mapping[str, Any], path: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    """The model weights of any accepted layout, with DataParallel/DDP's `module.` prefix stripped."""
    if isinstance(ckpt.get("model"), Mapping):
        state = ckpt["model"]
    elif isinstance(ckpt.get("state_dict"), Mapping):
        state = ckpt["state_dict"]
    else:
        state = ckpt
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{path}: no model state_dict found (non-tensor entries such as "
                              f"'{not_tensors[0]}'; expected keys 'model', 'state_dict' or a bare state_dict)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _listing(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


def load_checkpoint(model: nn.Module, path: str | Path, entry: str | None = None,
                    ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load weights into `model` (DDP-wrapped or not) from `path`; returns the whole checkpoint dict.

    Accepts `{'state_dict': {'module.' + key: ...}}` (the authors' release), a bare state_dict and our
    training checkpoints (`{'model': state_dict, ...}`); `entry` picks another state_dict of ours instead,
    e.g. 'model_ema'. Missing, unexpected or mis-shaped keys raise `CheckpointError` before any weight is
    copied, so a model is never left half-loaded. Keys starting with a prefix in `ignore` are skipped on
    both sides (e.g. ("fc.",) to take an ImageNet backbone).
    """
    ckpt = read_checkpoint(path)
    if entry is not None:
        if not isinstance(ckpt.get(entry), Mapping):
            raise CheckpointError(f"{path}: has no '{entry}' weights")
        state = extract_state_dict(ckpt[entry], path)
    else:
        state = extract_state_dict(ckpt, path)
    target = getattr(model, "module", model)
    expected = target.state_dict()
    if ignore:
        state = {k: v for k, v in state.items() if not k.startswith(ignore)}
        expected = {k: v for k, v in expected.items() if not k.startswith(ignore)}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} mis-shaped: {_listing(shapes, 3)}")
    if problems:
        raise CheckpointError(f"{path}: does not match {type(target).__name__}: " + "; ".join(problems))
    target.load_state_dict(state, strict=not ignore)
    return ckpt
