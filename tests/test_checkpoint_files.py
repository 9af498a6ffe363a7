"""Files that are not PyTorch checkpoints, damaged ones and timm train.py's own checkpoints, through every
reader: load_checkpoint / read_checkpoint, eval.py, train.py's resume, export.py, show_importance.py and the
detectors' weights_backbone (eval.py's exit code is in test_eval.py)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pickle
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.utils import CheckpointSaver, ModelEmaV3
from torch import nn
from train_utils import run, tiny_run, train_cmd

from models import CheckpointError, create_model, load_checkpoint
from models.checkpoint import read_checkpoint
from models.detection import fasterrcnn_lip_resnet50_fpn, get_detection_model
from scripts.export import build
from scripts.show_importance import main as show_importance
from training.checkpoint import Checkpointer, load_for_resume

NOT_A_CHECKPOINT = "not a PyTorch checkpoint"


def _real(path: Path, classifier: nn.Module) -> Path:
    torch.save({"model": classifier.state_dict()}, path)
    return path


def _with_data_pkl(path: Path, classifier: nn.Module, data: bytes) -> Path:
    """A real torch.save archive whose pickle record is replaced by `data`."""
    real = _real(path.with_name("real.pth"), classifier)
    with zipfile.ZipFile(real) as src, zipfile.ZipFile(path, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, data if name.endswith("/data.pkl") else src.read(name))
    return path


# The words each case's one-line answer must hold.
CASES = {"text": NOT_A_CHECKPOINT, "hello": NOT_A_CHECKPOINT, "random_bytes": NOT_A_CHECKPOINT,
         "json": NOT_A_CHECKPOINT, "empty": NOT_A_CHECKPOINT, "directory": NOT_A_CHECKPOINT, "missing": "not found",
         "truncated": NOT_A_CHECKPOINT, "empty_zip": NOT_A_CHECKPOINT, "other_zip": NOT_A_CHECKPOINT,
         "damaged_pickle": "damaged PyTorch checkpoint"}


def _write(case: str, path: Path, model: nn.Module) -> Path:
    if case == "text":
        path.write_text("this is not a checkpoint")
    elif case == "hello":
        path.write_text("hello")
    elif case == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif case == "json":
        path.write_text(json.dumps({"state_dict": {"fc.weight": [1.0]}}))
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "directory":
        path.mkdir()
    elif case == "truncated":
        path.write_bytes(_real(path, model).read_bytes()[:3000])
    elif case == "empty_zip":
        zipfile.ZipFile(path, "w").close()
    elif case == "other_zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("notes/readme.txt", "hello")
    elif case == "damaged_pickle":
        _with_data_pkl(path, model, b"this is not a checkpoint")
    return path


@pytest.fixture(params=list(CASES))
def bad_file(request: pytest.FixtureRequest, tmp_path: Path, classifier: nn.Module) -> tuple[Path, str]:
    return _write(request.param, tmp_path / "weights.pth", classifier), CASES[request.param]


def _one_line(e: pytest.ExceptionInfo, path: Path, expected: str) -> None:
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and expected in msg, msg


def test_load_checkpoint_and_read_checkpoint(bad_file: tuple[Path, str], classifier: nn.Module) -> None:
    path, expected = bad_file
    before = {k: v.clone() for k, v in classifier.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    _one_line(e, path, expected)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(classifier, path)
    _one_line(e, path, expected)
    assert all(torch.equal(before[k], v) for k, v in classifier.state_dict().items())


def test_eval_py_before_any_data_is_read(bad_file: tuple[Path, str]) -> None:
    path, expected = bad_file
    if "damaged" in expected:
        pytest.skip("the early check reads the file's head only; its pickle is read by load_checkpoint later")
    args = argparse.Namespace(config="configs/demo.yaml", overrides=["data.root=/no/such/folder"],
                              checkpoint=str(path), ema=False)
    with pytest.raises(CheckpointError) as e:
        importlib.import_module("eval").main(args, None, None)  # fails before the ranks or the log are used
    _one_line(e, path, expected)


def test_train_resume(bad_file: tuple[Path, str]) -> None:
    path, expected = bad_file
    if not path.exists() and not path.is_symlink():
        assert load_for_resume(path) is None  # nothing to resume: a fresh run
        return
    with pytest.raises(CheckpointError) as e:
        load_for_resume(path)
    _one_line(e, path, expected)


@pytest.mark.parametrize("layout", ["authors", "timm"])
def test_resume_from_a_checkpoint_train_py_did_not_write(tmp_path: Path, classifier: nn.Module, layout: str) -> None:
    """A weights file put where last.pth belongs is refused before anything is loaded, not half-restored."""
    last = tmp_path / "last.pth"
    extra = {"args": argparse.Namespace(model="lip_resnet_tiny"), "epoch": 4} if layout == "timm" else {}
    torch.save({"state_dict": classifier.state_dict(), **extra}, last)
    ckpt = load_for_resume(last)
    assert ckpt is not None
    with pytest.raises(CheckpointError) as e:
        Checkpointer(tmp_path, classifier, None, {"model": "lip_resnet_tiny"}, None).restore(ckpt)
    _one_line(e, last, "not a checkpoint written by train.py")


def test_export(bad_file: tuple[Path, str]) -> None:
    path, expected = bad_file
    with pytest.raises(CheckpointError) as e:
        build("lip_resnet_tiny", path, None)
    _one_line(e, path, expected)


def test_show_importance(bad_file: tuple[Path, str], tmp_path: Path) -> None:
    path, expected = bad_file
    config, image = tmp_path / "tiny.yaml", tmp_path / "cat.png"
    config.write_text("model: lip_resnet_tiny\ndata:\n  image_size: 32\n  val_resize: 36\n")
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(image)
    with pytest.raises(CheckpointError) as e:
        show_importance(["--config", str(config), "--checkpoint", str(path), "--out", str(tmp_path / "o.png"),
                         str(image)])
    _one_line(e, path, expected)


def test_detection_weights_backbone(bad_file: tuple[Path, str]) -> None:
    path, expected = bad_file
    with pytest.raises(CheckpointError) as e:
        get_detection_model("fasterrcnn_lip_resnet50_fpn", weights_backbone=str(path), num_classes=3)
    _one_line(e, path, expected)
    with pytest.raises(CheckpointError) as e:
        fasterrcnn_lip_resnet50_fpn(weights_backbone=path)
    _one_line(e, path, expected)


def test_a_pickle_that_needs_code_names_the_global(tmp_path: Path, classifier: nn.Module, payload) -> None:
    for legacy in (False, True):
        path = tmp_path / f"evil{int(legacy)}.pth"
        torch.save({"model": classifier.state_dict(), "x": payload}, path, pickle_module=pickle,
                   _use_new_zipfile_serialization=not legacy)
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(classifier, path)
        _one_line(e, path, "needs code to unpickle")
        assert f"global {os.system.__module__}.system" in str(e.value)
        assert not payload.marker.exists()


def test_legacy_format_still_loads(tmp_path: Path, classifier: nn.Module) -> None:
    path = tmp_path / "legacy.pth"
    torch.save({"state_dict": classifier.state_dict()}, path, _use_new_zipfile_serialization=False)
    fresh = create_model("lip_resnet_tiny", num_classes=5)
    load_checkpoint(fresh, path)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), classifier.state_dict().values(),
                                                 strict=True))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated, its files still exist
def test_torchscript_archive_is_named(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), path)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    _one_line(e, path, "TorchScript archive")


# ---------------------------------------------------------------- timm train.py checkpoints


@pytest.fixture()
def timm_run(tmp_path: Path, classifier: nn.Module, randomise) -> tuple[Path, nn.Module, nn.Module]:
    """last.pth.tar and model_best.pth.tar as timm's train.py writes them: its CheckpointSaver, an
    argparse.Namespace of arguments, an optimizer with state and an EMA copy that differs from the model."""
    model = classifier
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    ema = ModelEmaV3(model, decay=0.9)
    randomise(ema.module, seed=5)
    args = argparse.Namespace(model="lip_resnet_tiny", lr=0.1, epochs=2, model_ema=True, data_dir="/data")
    saver = CheckpointSaver(model, optimizer, args=args, model_ema=ema, checkpoint_dir=str(tmp_path))
    saver.save_checkpoint(0, metric=12.5)
    return tmp_path, model, ema.module


def _logits(model: nn.Module) -> torch.Tensor:
    torch.manual_seed(3)
    with torch.no_grad():
        return model.eval()(torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("name", ["last.pth.tar", "model_best.pth.tar"])
def test_timm_train_checkpoint_loads_model_and_ema(timm_run: tuple[Path, nn.Module, nn.Module], name: str) -> None:
    folder, model, ema = timm_run
    path = folder / name
    ckpt = read_checkpoint(path)
    assert isinstance(ckpt["args"], argparse.Namespace) and ckpt["args"].model == "lip_resnet_tiny"
    assert {"state_dict", "state_dict_ema", "optimizer", "epoch", "arch", "version"} <= set(ckpt)
    plain = create_model("lip_resnet_tiny", num_classes=5)
    load_checkpoint(plain, path)
    torch.testing.assert_close(_logits(plain), _logits(model), atol=0, rtol=0)
    averaged = create_model("lip_resnet_tiny", num_classes=5)
    load_checkpoint(averaged, path, entry="model_ema")
    torch.testing.assert_close(_logits(averaged), _logits(ema), atol=0, rtol=0)
    assert not torch.equal(_logits(plain), _logits(averaged))


def test_compiled_and_ddp_prefixes_are_stripped(tmp_path: Path, classifier: nn.Module) -> None:
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"_orig_mod.module.{k}": v for k, v in classifier.state_dict().items()}}, path)
    fresh = create_model("lip_resnet_tiny", num_classes=5)
    load_checkpoint(fresh, path)
    torch.testing.assert_close(_logits(fresh), _logits(classifier), atol=0, rtol=0)


@pytest.mark.slow
def test_train_py_refuses_a_last_pth_that_is_not_a_checkpoint(demo_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    last = out / "checkpoints" / "last.pth"
    last.write_text("this is not a checkpoint")
    proc = run(train_cmd(1, tiny_run(demo_data, out, "train.epochs=1")))
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(last) in lines[0] and NOT_A_CHECKPOINT in lines[0], proc.stderr
    assert last.read_text() == "this is not a checkpoint"  # left as it was, not overwritten by a fresh run


@pytest.mark.slow
def test_export_py_refuses_a_file_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    notes = tmp_path / "notes.pth"
    notes.write_text("this is not a checkpoint")
    proc = run([sys.executable, "scripts/export.py", "--config", "configs/demo.yaml", "--checkpoint", str(notes),
                "--format", "safetensors", "--out", str(tmp_path / "m.safetensors")])
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(notes) in lines[0] and NOT_A_CHECKPOINT in lines[0], proc.stderr
    assert not (tmp_path / "m.safetensors").exists()
