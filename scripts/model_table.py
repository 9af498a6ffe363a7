"""Parameters and FLOPs of the six models next to the paper's table, as markdown.

    python scripts/model_table.py [--resolution 224]

FLOPs are fvcore's FlopCountAnalysis (one multiply-add counts one), the figure the paper reports.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import create_model  # noqa: E402

# name: (paper top-1, paper top-5, paper params (M), paper FLOPs (G))
PAPER = {
    "resnet50": (76.40, 93.15, 25.6, 4.12),
    "lip_resnet50": (78.19, 93.96, 23.9, 5.33),
    "resnet101": (77.98, 93.98, 44.5, 7.85),
    "lip_resnet101": (79.33, 94.60, 42.9, 9.06),
    "densenet121": (75.62, 92.56, 8.0, 2.88),
    "lip_densenet121": (76.64, 93.16, 8.7, 4.13),
}


def count_flops(model: nn.Module, resolution: int = 224) -> float:
    """fvcore multiply-adds of one image; LIP and gate arithmetic are not counted, as in the paper."""
    from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(model.eval(), torch.zeros(1, 3, resolution, resolution))
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    return float(analysis.total())


def table(resolution: int = 224) -> str:
    rows = ["| model | params | paper params | FLOPs | paper FLOPs | paper top-1 | paper top-5 |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for name, (top1, top5, params_m, flops_g) in PAPER.items():
        model = create_model(name)
        params = sum(p.numel() for p in model.parameters())
        flops = count_flops(model, resolution)
        rows.append(f"| {name} | {params:,} | {params_m}M | {flops / 1e9:.3f}G | {flops_g}G | {top1} | {top5} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=224)
    args = parser.parse_args()
    print(table(args.resolution))


if __name__ == "__main__":
    main()
