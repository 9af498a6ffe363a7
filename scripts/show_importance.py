"""LIP importance maps of your own images as one PNG: a row per image, a labelled column per LIP layer.

    python scripts/show_importance.py --config configs/lip_resnet50.yaml \
        --checkpoint runs/lip_resnet50/checkpoints/best.pth cat.jpg dog.png --out importance.png

The picture TensorBoard shows during training (lip/importance_maps), for any images: each goes through
the config's validation transform (shorter side data.val_resize, center crop data.val_image_size, or
data.image_size when that is unset), and each map is exp(logit) of one LIP layer averaged over channels
and scaled to [0, 1] per image, shown in the 'hot' colormap (bright = weighed most when pooling). No
dataset is read: the number of classes comes from the checkpoint (ours, the authors' release or timm's) and
data.root may be unset. Exit 2 on bad input.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import DataError, load_val_images  # noqa: E402
from models import CheckpointError, create_model, importance_maps, load_checkpoint  # noqa: E402
from models.checkpoint import extract_state_dict, read_checkpoint  # noqa: E402
from training.cli import ArgumentParser  # noqa: E402
from training.config import load_config  # noqa: E402
from training.errors import EXIT_USER_ERROR, UserError  # noqa: E402
from training.metrics import importance_figure  # noqa: E402


def checkpoint_classes(model_name: str, state: Mapping[str, torch.Tensor], path: Path) -> int:
    """Outputs of the classifier (the model's last Linear layer) in the checkpoint's weights."""
    probe = create_model(model_name, num_classes=1)
    head = [name for name, m in probe.named_modules() if isinstance(m, nn.Linear)][-1]
    weight = state.get(f"{head}.weight")
    if weight is None or weight.dim() != 2:
        raise CheckpointError(f"{path}: no classifier weight '{head}.weight' for a {model_name}")
    return int(weight.shape[0])


def main(argv: Sequence[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="our .pth or the authors' release")
    parser.add_argument("--out", required=True, help="the PNG file to write")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="JPEG or PNG files, one row each")
    args = parser.parse_args(argv)

    cfg = load_config(args.config, require_data=False)
    checkpoint, out = Path(args.checkpoint), Path(args.out)
    for image in args.images:
        if Path(image).is_dir():
            raise UserError(f"{image}: is a directory, not an image file")
        if not Path(image).is_file():
            raise UserError(f"{image}: image file not found")
    state = extract_state_dict(read_checkpoint(checkpoint), checkpoint)
    num_classes = cfg["num_classes"] or checkpoint_classes(cfg["model"], state, checkpoint)
    model = create_model(cfg["model"], num_classes=num_classes)
    load_checkpoint(model, checkpoint)  # all or nothing, and a one-line error if it is another model's

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = cfg["data"].get("val_image_size") or cfg["data"]["image_size"]  # the val crop, as in evaluation
    images = load_val_images(args.images, size, cfg["data"]["val_resize"], device)
    with torch.no_grad():
        maps = importance_maps(model.to(device), images)
    if not maps:
        raise UserError(f"{cfg['model']} has no LIP layers, so there are no importance maps to show")
    out.parent.mkdir(parents=True, exist_ok=True)
    importance_figure(images, maps).save(out, format="PNG")
    print(f"wrote {out}: {len(args.images)} image(s) x {len(maps)} LIP layers ({', '.join(maps)})")


if __name__ == "__main__":
    try:
        main()
    except (UserError, DataError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
