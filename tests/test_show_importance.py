"""scripts/show_importance.py: a labelled PNG of the LIP importance maps of a user's own images, without a
dataset (num_classes from the checkpoint, data.root unset)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from train_utils import ENV, ROOT

from data import DataError
from data.torchvision_loader import val_transform
from models import CheckpointError, create_model, importance_maps
from scripts.show_importance import main
from training.errors import UserError
from training.metrics import PAD

TILE = 64
LAYERS = 7  # lip_resnet_tiny: the stem and six stride-2 LIP layers


@pytest.fixture()
def inputs(tmp_path: Path, classifier: nn.Module) -> tuple[Path, Path, list[Path]]:
    """A config without data.root, the seeded classifier as a training checkpoint, a JPEG and a PNG."""
    config = tmp_path / "tiny.yaml"
    config.write_text(f"model: lip_resnet_tiny\ndata:\n  image_size: {TILE}\n  val_resize: 73\n")
    checkpoint = tmp_path / "tiny.pth"
    torch.save({"model": classifier.state_dict(), "epoch": 1}, checkpoint)
    rng = np.random.default_rng(0)
    images = []
    for name, size in (("wide.jpg", (120, 90)), ("tall.png", (80, 100))):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        pixels[size[1] // 3: size[1] // 2] = 255  # a bright band: structure for the maps to differ on
        Image.fromarray(pixels).save(tmp_path / name)
        images.append(tmp_path / name)
    return config, checkpoint, images


def test_one_labelled_row_per_image_and_column_per_layer(inputs, classifier: nn.Module, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    config, checkpoint, images = inputs
    out = tmp_path / "figs" / "importance.png"
    main(["--config", str(config), "--checkpoint", str(checkpoint), *map(str, images), "--out", str(out)])
    assert f"wrote {out}: 2 image(s) x {LAYERS} LIP layers (maxpool, layer2.0.conv2.0" in capsys.readouterr().out

    with Image.open(out) as png:
        assert png.format == "PNG"
        figure = np.asarray(png.convert("RGB")).astype(np.int16)
    width = PAD + (1 + LAYERS) * (TILE + PAD)
    header = figure.shape[0] - (PAD + 2 * (TILE + PAD))
    assert figure.shape[1] == width and header > 0
    for column in range(1 + LAYERS):  # every column has a label: dark text on the white header
        left = PAD + column * (TILE + PAD)
        assert (figure[:header, left:left + TILE] < 128).any(), f"column {column} has no label"

    def tile(row: int, column: int) -> np.ndarray:
        top, left = header + PAD + row * (TILE + PAD), PAD + column * (TILE + PAD)
        return figure[top:top + TILE, left:left + TILE]

    # column 0 is the image itself after the validation transform; the maps vary within each image
    for row, path in enumerate(images):
        with Image.open(path) as im:
            expected = val_transform(im, TILE, 73).astype(np.int16)  # as torchvision's Resize + CenterCrop
        assert np.abs(tile(row, 0) - expected).max() <= 2, path.name
        for column in range(1, 1 + LAYERS):
            assert tile(row, column).std() > 5, (row, column)

    # the maps are those of the checkpoint's weights: the seeded classifier's own maps agree in shape
    x = torch.zeros(1, 3, TILE, TILE)
    assert len(importance_maps(classifier, x)) == LAYERS


@pytest.mark.parametrize("case", ["missing_image", "directory_image", "not_an_image", "not_a_checkpoint",
                                  "wrong_model", "baseline"])
def test_bad_input_is_one_line_before_anything_is_written(inputs, tmp_path: Path, case: str) -> None:
    config, checkpoint, images = inputs
    out = tmp_path / "fig.png"
    if case == "missing_image":
        images, expected = [tmp_path / "nope.jpg"], "nope.jpg: image file not found"
    elif case == "directory_image":
        images, expected = [tmp_path], f"{tmp_path}: is a directory, not an image file"
    elif case == "not_a_checkpoint":
        checkpoint.write_text("this is not a checkpoint")
        expected = f"{checkpoint}: not a PyTorch checkpoint"
    elif case == "not_an_image":
        (tmp_path / "notes.jpg").write_text("not a picture")
        images, expected = [tmp_path / "notes.jpg"], "notes.jpg: cannot be read as a JPEG or PNG image"
    elif case == "wrong_model":
        config.write_text("model: lip_resnet50\n")
        expected = f"{checkpoint}: does not match"
    else:
        config.write_text("model: resnet50\n")
        torch.save(create_model("resnet50", num_classes=3).state_dict(), checkpoint)
        expected = "resnet50 has no LIP layers"
    with pytest.raises((UserError, DataError, CheckpointError)) as e:
        main(["--config", str(config), "--checkpoint", str(checkpoint), *map(str, images), "--out", str(out)])
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert not out.exists()


@pytest.mark.slow
def test_command_line_error_is_one_line_exit_2(inputs, tmp_path: Path) -> None:
    config, checkpoint, images = inputs
    checkpoint.write_text("hello")
    proc = subprocess.run([sys.executable, "scripts/show_importance.py", "--config", str(config), "--checkpoint",
                           str(checkpoint), str(images[0]), "--out", str(tmp_path / "fig.png")],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {checkpoint}: not a PyTorch checkpoint"), proc.stderr
