"""Config: schema checks, one-line errors, overrides, and the six paper-recipe configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from training.config import SCHEMA, ConfigError, check_world_size, load_config, save_config
from training.recipe import build_recipe, scaled_lr

ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = ["lip_resnet50", "lip_resnet101", "lip_densenet121", "resnet50", "resnet101", "densenet121"]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_yaml_and_overrides_merge(tmp_path: Path) -> None:
    path = write(tmp_path, "model: resnet50\ndata:\n  root: /x\ntrain:\n  epochs: 5\noptim:\n  weight_decay: 1e-4\n")
    cfg = load_config(path, ["train.epochs=7", "optim.lr=0.2", "sched.milestones=[1, 2]", "train.amp=bf16"])
    assert cfg["model"] == "resnet50"
    assert cfg["train"]["epochs"] == 7  # command line beats the file
    assert cfg["optim"]["lr"] == 0.2
    assert cfg["optim"]["weight_decay"] == 1e-4  # PyYAML reads 1e-4 as a string; accepted as a number
    assert cfg["sched"]["milestones"] == [1, 2]
    assert cfg["train"]["batch_size"] == SCHEMA["train.batch_size"].default
    assert cfg["output_dir"] == "runs/cfg"  # default: named after the config file
    save_config(cfg, tmp_path / "resolved.yaml")
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text()) == cfg


@pytest.mark.parametrize(("text", "overrides", "expected"), [
    ("data:\n  root: /x\n", ["optim.lrr=0.1"],
     "unknown config key 'optim.lrr' (command line); did you mean 'optim.lr'?"),
    ("data:\n  root: /x\ntrain:\n  epoch: 3\n", [], "unknown config key 'train.epoch'"),
    ("data:\n  root: /x\n", ["train.amp=fp8"], "train.amp='fp8' (command line) is not allowed: expected one of bf16, "
                                               "fp16, off"),
    ("data:\n  root: /x\n", ["train.epochs=two"],
     "train.epochs='two' (command line) is not allowed: expected an integer"),
    ("data:\n  root: /x\n", ["train.epochs=0"], "expected an integer >= 1"),
    ("data:\n  root: /x\n", ["train.channels_last=3"], "expected true or false"),
    ("data:\n  root: /x\n", ["data.backend=pil"], "expected one of dali, dali_cpu, torchvision"),
    ("data:\n  root: /x\n", ["model=lip_resnet5"], "model='lip_resnet5'"),
    ("data:\n  root: /x\n", ["sched.milestones=[60, 30]"], "sched.milestones=[60, 30] is not allowed"),
    ("data:\n  root: /x\n", ["epochs"], "override 'epochs' is not of the form key=value"),
    ("train: [1\n", [], "is not valid YAML"),
    ("model: resnet50\n", [], "data.root is not set"),
])
def test_errors_are_one_line_naming_the_key(tmp_path: Path, text: str, overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text), overrides)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_global_batch_splits_evenly(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "data:\n  root: /x\n"), ["train.batch_size=12"])
    assert check_world_size(cfg, 4) == 3
    with pytest.raises(ConfigError, match=r"train.batch_size=12 does not split evenly across 5 ranks"):
        check_world_size(cfg, 5)


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_recipe_configs(name: str) -> None:
    """SGD momentum 0.9 (no Nesterov), lr 0.1 per 256, wd 1e-4 on all parameters, batch 256, 90 epochs,
    x0.1 at 30/60/80, RandomResizedCrop 224 / resize 256, no extras; checked on the built optimizer too."""
    from models import create_model

    cfg = load_config(ROOT / "configs" / f"{name}.yaml", ["data.root=/imagenet"])
    assert cfg["model"] == name
    assert cfg["train"]["epochs"] == 90 and cfg["train"]["batch_size"] == 256
    assert cfg["data"]["image_size"] == 224 and cfg["data"]["val_resize"] == 256
    assert cfg["optim"] == {"name": "momentum", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4,
                            "filter_bias_and_bn": False}
    assert cfg["sched"] == {"name": "step", "milestones": [30, 60, 80], "gamma": 0.1, "min_lr": 0.0,
                            "warmup_epochs": 0}
    assert cfg["data"]["progressive"]["start_size"] is None and cfg["data"]["val_image_size"] is None
    assert (cfg["train"]["label_smoothing"], cfg["train"]["mixup_alpha"], cfg["train"]["cutmix_alpha"],
            cfg["train"]["ema_decay"]) == (0, 0, 0, 0)
    assert scaled_lr(cfg) == pytest.approx(0.1)

    if name != "lip_resnet50":  # building one model is enough to check the optimizer and schedule
        return
    model = create_model(name, num_classes=10)
    steps = 4  # pretend an epoch is 4 steps
    recipe = build_recipe(cfg, model, steps, 10, torch.device("cpu"))
    groups = recipe.optimizer.param_groups
    assert type(recipe.optimizer).__name__ == "SGD"
    assert all(g["momentum"] == 0.9 and not g["nesterov"] and g["weight_decay"] == 1e-4 for g in groups)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    lrs = []
    for epoch in (0, 29, 30, 59, 60, 79, 80, 89):
        recipe.scheduler.step_update(epoch * steps)
        lrs.append(groups[0]["lr"])
        recipe.scheduler.step_update(epoch * steps + steps - 1)
        assert groups[0]["lr"] == lrs[-1]  # constant within an epoch
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001, 0.0001, 0.0001])
    assert recipe.mixup is None and recipe.ema is None and recipe.scaler is None


def test_cli_error_is_one_line_exit_2(tmp_path: Path) -> None:
    """A typo'd key on the command line: one line, exit 2, no traceback, before anything is read."""
    proc = subprocess.run([sys.executable, "train.py", "--config", "configs/demo.yaml", "optim.lrr=0.1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["error: unknown config key 'optim.lrr' (command line); did you mean 'optim.lr'?"]
    assert "Traceback" not in proc.stdout + proc.stderr
