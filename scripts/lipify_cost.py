"""What lipify costs: parameters and FLOPs of timm CNNs before and after, per logit module kind, as markdown.

    python scripts/lipify_cost.py [--resolution 224] [--models resnet18 efficientnet_b0 ...]

FLOPs are fvcore's multiply-adds at 1x3xRxR, as in scripts/model_table.py (LIP's own arithmetic is not
counted, as in the paper); the increase comes from strided convs now running at full resolution and
from the logit modules.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import lipify  # noqa: E402
from models.lipify import LIPIFIED, LOGIT_KINDS  # noqa: E402
from scripts.model_table import count_flops  # noqa: E402


def table(names: list[str], resolution: int) -> str:
    rows = ["| model | LIP layers | logit module | params | params + | FLOPs | FLOPs + |",
            "|---|---:|---|---:|---:|---:|---:|"]
    for name in names:
        torch.manual_seed(0)
        base = timm.create_model(name)
        params0 = sum(p.numel() for p in base.parameters())
        flops0 = count_flops(base, resolution)
        rows.append(f"| {name} | 0 | - | {params0 / 1e6:.2f}M | | {flops0 / 1e9:.3f}G | |")
        for kind in LOGIT_KINDS:
            model = lipify(timm.create_model(name), logit=kind)
            layers = sum("LIP" in type(m).__name__ and hasattr(m, "logit") for m in model.modules())
            params = sum(p.numel() for p in model.parameters())
            flops = count_flops(model, resolution)
            more_params, more_flops = 100 * (params / params0 - 1), 100 * (flops / flops0 - 1)
            rows.append(f"| lip_{name} | {layers} | {kind} | {params / 1e6:.2f}M | {more_params:+.1f}% "
                        f"| {flops / 1e9:.3f}G | {more_flops:+.1f}% |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--models", nargs="+", default=list(LIPIFIED.values()))
    args = parser.parse_args()
    print(table(args.models, args.resolution))


if __name__ == "__main__":
    main()
