"""How the arithmetic runs: TF32, cuDNN autotuning, deterministic algorithms and `torch.compile`.

Exact resume (same data order, augmentation, lr schedule, RNG streams) holds on every device, but on a GPU
the arithmetic itself is not bit-reproducible by default: cuDNN picks its fastest (possibly atomics-based)
kernels, TF32 rounds fp32 matmul/conv inputs to 10 mantissa bits, and NCCL's reduction order may vary.
`train.deterministic=true` trades speed for reruns that repeat on the same GPUs and layout.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

# cuBLAS needs a fixed workspace to be deterministic; it is read when cuBLAS first starts, so this is set
# before any CUDA work (https://docs.nvidia.com/cuda/cublas/#results-reproducibility).
CUBLAS_WORKSPACE = ":4096:8"


def configure(train: dict[str, Any], device: torch.device) -> str:
    """Apply train.tf32 / train.deterministic; returns what the run log states about them."""
    deterministic, tf32 = train["deterministic"], train["tf32"] and not train["deterministic"]
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        # warn_only: ops without a deterministic kernel (e.g. adaptive_avg_pool2d's CUDA backward, in the
        # classifier head of every model here) warn once instead of stopping the run.
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if device.type != "cuda":
        return f"deterministic {'on' if deterministic else 'off'} (tf32 applies on a GPU only)"
    return (f"tf32 {'on' if tf32 else 'off'}, cudnn.benchmark {'on' if torch.backends.cudnn.benchmark else 'off'}, "
            f"deterministic {'on' if deterministic else 'off'}")


def compile_model(model: nn.Module, train: dict[str, Any]) -> nn.Module:
    """`torch.compile(model)` when train.compile, else the model itself.

    The compiled module shares the model's parameters and buffers, so checkpoints, the EMA copy and the
    importance maps keep using the plain module (no `_orig_mod.` prefixes in saved keys). Shapes are static:
    training batches all have one shape, and each other one (the last validation batch, a new image size)
    compiles once with the fastest kernels for it, instead of switching the model to symbolic shapes.
    """
    if not train["compile"]:
        return model
    return torch.compile(model, mode=train["compile_mode"], dynamic=False)
