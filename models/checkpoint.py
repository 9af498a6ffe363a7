"""Safe, all-or-nothing loading of model weights: the authors' releases, our training checkpoints and timm's.

A file is first recognised as a torch.save file (a zip archive holding a data.pkl record, or the legacy
format's magic number), so anything else is answered as "not a PyTorch checkpoint" rather than with
whatever the unpickler makes of its bytes; only then is it unpickled with `weights_only=True`.
"""

from __future__ import annotations

import argparse
import io
import pickle
import pickletools
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

# Plain numpy scalars (e.g. a saved best accuracy) rebuild without running code from the file; numpy 1
# pickles name the scalar constructor `numpy.core...`, numpy 2 pickles `numpy._core...`.
_SCALAR = np._core.multiarray.scalar
_SAFE_NUMPY = [np.dtype, _SCALAR, (_SCALAR, "numpy.core.multiarray.scalar"),
               *{type(np.dtype(t)) for t in "efdhilqbBHILQ?"}]
# timm's train.py stores its arguments as a Namespace (timm's own loader allows it the same way); it
# rebuilds from plain attributes, never by calling code named in the file.
_SAFE_GLOBALS = [*_SAFE_NUMPY, argparse.Namespace]
# What torch's unpickler raises on bytes that are not a pickle it can follow (damaged archives).
_CORRUPT = (RuntimeError, EOFError, IndexError, KeyError, ValueError, TypeError, AttributeError, OverflowError)
_INT_OPCODES = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message is one line naming the file and the problem."""


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _legacy_magic(head: bytes) -> bool:
    """Whether `head` starts with the pickled magic number of torch.save's pre-1.6 format (any protocol)."""
    try:
        for opcode, arg, _pos in pickletools.genops(io.BytesIO(head)):
            if opcode.name in ("PROTO", "FRAME"):
                continue
            return opcode.name in _INT_OPCODES and arg == torch.serialization.MAGIC_NUMBER
    except ValueError:  # an unknown opcode or a truncated argument: not a pickle at all
        return False
    return False


def check_checkpoint_file(path: str | Path) -> None:
    """Raise `CheckpointError` unless `path` is a file written by torch.save; reads only its zip index or first bytes.

    Cheap enough for a script to call before it builds its data loaders, so a wrong path fails at once.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a PyTorch checkpoint file")
    try:
        with open(path, "rb") as f:
            head = f.read(64)
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
            top = names[0].split("/")[0] if names else ""
            if f"{top}/data.pkl" not in names:
                raise CheckpointError(f"{path}: not a PyTorch checkpoint (a zip archive without a data.pkl record)")
            if f"{top}/constants.pkl" in names:
                raise CheckpointError(f"{path}: not a PyTorch checkpoint of weights but a TorchScript archive "
                                      "(torch.jit.save); load it with torch.jit.load")
            return
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or _first_line(e)})") from None
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (a damaged zip archive: {e})") from None
    if not head:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (the file is empty)")
    if head.startswith(b"PK\x03\x04"):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (a truncated or damaged zip archive)")
    if not _legacy_magic(head):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither torch.save's zip archive nor its "
                              "legacy format)")


def _refusal(e: pickle.UnpicklingError) -> str:
    """What the weights-only unpickler refused, in one line: the global it would have to import, if named."""
    text = str(e)
    found = re.search(r"GLOBAL\s+([\w.]+)", text)
    if found:
        return (f"refused: it needs code to unpickle (global {found.group(1)} is outside the allowed set of "
                "tensors, plain containers, numpy scalars and argparse.Namespace)")
    detail = text.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation")[0]
    return f"refused by the weights-only unpickler ({' '.join(detail.split()) or type(e).__name__})"


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file with `weights_only=True`: tensors and plain containers only, never code."""
    path = Path(path)
    check_checkpoint_file(path)
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: {_refusal(e)}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or _first_line(e)})") from None
    except _CORRUPT as e:
        raise CheckpointError(f"{path}: a damaged PyTorch checkpoint, its contents cannot be read "
                              f"({_first_line(e)})") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of weights, found {type(obj).__name__}")
    return dict(obj)


def extract_state_dict(ckpt: Mapping[str, Any], path: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    """The model weights of any accepted layout, with DDP's `module.` and torch.compile's `_orig_mod.` stripped.

    timm's train.py checkpoints hold them under 'state_dict' (and the EMA copy under 'state_dict_ema').
    """
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
    state = dict(state)
    for prefix in ("_orig_mod.", "module.", "_orig_mod."):  # torch.compile and DDP wrappers, in either order
        consume_prefix_in_state_dict_if_present(state, prefix)
    return state


# Where the EMA weights live: our training checkpoints, timm train.py's.
_EMA_ENTRIES = ("model_ema", "state_dict_ema")


def _listing(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


def load_checkpoint(model: nn.Module, path: str | Path, entry: str | None = None,
                    ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load weights into `model` (DDP-wrapped or not) from `path`; returns the whole checkpoint dict.

    Accepts `{'state_dict': {'module.' + key: ...}}` (the authors' release), a bare state_dict and our
    training checkpoints (`{'model': state_dict, ...}`) and timm train.py's (`last.pth.tar`, `model_best.pth.tar`);
    `entry` picks another state_dict instead: 'model_ema' takes the EMA weights of ours or of timm's
    ('state_dict_ema'). Missing, unexpected or mis-shaped keys raise `CheckpointError` before any weight is
    copied, so a model is never left half-loaded. Keys starting with a prefix in `ignore` are skipped on
    both sides (e.g. ("fc.",) to take an ImageNet backbone).
    """
    ckpt = read_checkpoint(path)
    if entry is not None:
        if entry in _EMA_ENTRIES and not isinstance(ckpt.get(entry), Mapping):
            entry = next((k for k in _EMA_ENTRIES if isinstance(ckpt.get(k), Mapping)), entry)
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
