"""TensorBoard pictures of the importance maps: the fixed val images, the labelled figure, the writer's end."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from data import build_loader
from models import importance_maps
from training.logger import RunLog
from training.metrics import PAD, Metrics, fixed_val_images


def val_split(root: Path, classes: int = 3, per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / "val" / f"n{c:08d}"
        folder.mkdir(parents=True)
        for k in range(per_class):
            Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(folder / f"{k}.JPEG")
    return root


def test_fixed_val_images_spread_over_the_split_and_stay_the_same(tmp_path: Path) -> None:
    data = {"root": str(val_split(tmp_path / "d")), "backend": "torchvision", "workers": 0, "image_size": 32,
            "val_resize": 36}
    loader = build_loader(data, "val", batch_size=4, rank=0, world_size=1, seed=0, device="cpu",
                          cache_dir=tmp_path / "cache", log=lambda _: None)
    first = fixed_val_images(loader, 3, data, torch.device("cpu"))
    assert first.shape == (3, 3, 32, 32) and first.dtype == torch.float32
    # one image of each class (first, middle, last of the sorted split), in the loader's own val transform
    batches = [images for images, _ in loader]
    everything = torch.cat(batches)
    for row, item in enumerate((0, 6, 11)):
        torch.testing.assert_close(first[row], everything[item])
    assert torch.equal(first, fixed_val_images(loader, 3, data, torch.device("cpu")))
    assert fixed_val_images(loader, 0, data, torch.device("cpu")) is None
    assert fixed_val_images(loader, 50, data, torch.device("cpu")).shape[0] == 12  # at most the split


def test_labelled_figure_in_tensorboard_and_writer_closed_with_the_run(tmp_path: Path, classifier: nn.Module) -> None:
    metrics = Metrics(tmp_path, [], 0)
    log = RunLog(0, 1)
    log.close_at_end(metrics.close)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    maps = importance_maps(classifier, images)
    metrics.importance_maps(5, images, maps)
    log.close()  # what cli.run_main does at the end of a run, whichever way it ends
    assert metrics.tb.all_writers is None  # closed: everything is on disk

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    [picture] = events.Images("lip/importance_maps")
    figure = np.asarray(Image.open(io.BytesIO(picture.encoded_image_string)).convert("L"))
    columns = 1 + len(maps)
    header = figure.shape[0] - (PAD + 2 * (32 + PAD))
    assert picture.step == 5 and figure.shape[1] == PAD + columns * (32 + PAD) and header > 0
    for column in range(columns):
        left = PAD + column * (32 + PAD)
        assert (figure[:header, left:left + 32] < 128).any(), f"column {column} has no label"
    [caption] = events.Tensors("lip/importance_maps_columns/text_summary")
    assert caption.tensor_proto.string_val[0].decode() == "image | " + " | ".join(maps)
