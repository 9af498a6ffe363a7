"""Export a trained checkpoint for deployment: ONNX (runs in onnxruntime) or safetensors (loads in timm).

    python scripts/export.py --config configs/lip_resnet50.yaml --checkpoint best.pth --format onnx \
        --out lip_resnet50.onnx
    python scripts/export.py --config configs/lip_resnet50.yaml --checkpoint lip_resnet-50.pth.tar \
        --format safetensors --out lip_resnet50.safetensors

No dataset is needed: the config gives the model and the preprocessing, the number of classes comes from
the checkpoint's classifier, and data.root may be unset. The checkpoint may be ours or the authors' release.

ONNX: input `image` (N, 3, S, S) float32, normalised with the ImageNet mean/std after resizing the shorter
side to data.val_resize and center-cropping S = data.image_size (stored in the file's metadata); output
`logits` (N, classes); N is dynamic. LIP is exported as plain ONNX operators (AveragePool of x * e over
AveragePool of e, e = exp(logit - 12): see docs/export.md). The script checks onnxruntime against PyTorch on a
random batch before it reports success, and reports both latencies at batch 1. With --fp16 the graph
computes in float16 (input and logits stay float32; LIP itself runs in float32, as in PyTorch).

safetensors: the model's state_dict, which timm loads as pretrained weights:
    timm.create_model("lip_resnet50", pretrained=True, pretrained_cfg_overlay=dict(file="lip_resnet50.safetensors"))
(add num_classes=N to both the call and the overlay for a classifier other than 1000 classes).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import LIPPool, create_model, load_checkpoint  # noqa: E402
from models.checkpoint import check_checkpoint_file, extract_state_dict, read_checkpoint  # noqa: E402
from training.cli import ArgumentParser, run_main  # noqa: E402
from training.config import load_config  # noqa: E402
from training.errors import UserError  # noqa: E402
from training.logger import RunLog  # noqa: E402

# Export reads no data; a placeholder lets a config whose data.root is unset pass the config check.
NO_DATA_ROOT = "data.root=(not used by export)"
TOLERANCE = 1e-4  # onnxruntime vs PyTorch, relative to the largest |logit|
FP16_TOLERANCE = 1e-2  # the same for --fp16 graphs (float16 has a 1e-3 rounding step)
LATENCY_REPEATS = 5  # timed batch-1 runs behind the report line (median)


def classifier_key(model: nn.Module) -> str:
    """The weight key of the model's classifier: its last nn.Linear."""
    name = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    return f"{name}.weight"


def trained_looking(model: nn.Module, seed: int = 0) -> nn.Module:
    """`model` with random BN statistics and non-zero LIP logit convs, as after training, in eval mode.

    The reference init zeroes the last conv of the logit heads (every LIP starts as average pooling), which
    would leave the logit paths out of any check or timing; this makes every part of the network matter.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
            elif isinstance(m, LIPPool):
                for conv in m.logit_module():
                    if isinstance(conv, nn.Conv2d):
                        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.1)
    return model.eval()


class Float16(nn.Module):
    """`model` in float16 behind a float32 input and output, so an fp16 graph keeps the file's interface."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.half()).float()


def build(name: str, checkpoint: Path, num_classes: int | None) -> nn.Module:
    """The config's model with the checkpoint's weights, sized by the checkpoint's classifier."""
    model = create_model(name)
    key = classifier_key(model)
    state = extract_state_dict(read_checkpoint(checkpoint), checkpoint)
    if key not in state:
        raise UserError(f"{checkpoint}: no classifier weight '{key}' in it; is it a {name} checkpoint?")
    classes = state[key].shape[0]
    if num_classes is not None and num_classes != classes:
        raise UserError(f"num_classes={num_classes} in the config, but the classifier of {checkpoint} has "
                        f"{classes} outputs")
    if classes != model.state_dict()[key].shape[0]:
        model = create_model(name, num_classes=classes)
    load_checkpoint(model, checkpoint)
    return model.eval()


def preprocessing(cfg: dict) -> dict[str, str]:
    data = cfg["data"]
    return {"model": cfg["model"], "image_size": str(data["image_size"]), "resize_shorter": str(data["val_resize"]),
            "mean": json.dumps(IMAGENET_DEFAULT_MEAN), "std": json.dumps(IMAGENET_DEFAULT_STD),
            "layout": "NCHW float32 RGB in [0, 1], normalised"}


def export_safetensors(model: nn.Module, out: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out), metadata={"format": "pt", **metadata})


def export_onnx(model: nn.Module, out: Path, image_size: int, metadata: dict[str, str],
                fp16: bool = False) -> float:
    """Write the ONNX file; returns onnxruntime's largest deviation from PyTorch relative to the largest logit.

    The check compares against `model` in float32 also when the file is float16.
    """
    import onnx

    from models.lip import export_decompositions

    exported = Float16(copy.deepcopy(model)).eval() if fp16 else model
    example = torch.randn(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        program = torch.export.export(exported, (example,), dynamic_shapes=({0: batch},))
        program = program.run_decompositions(export_decompositions())
        torch.onnx.export(program, (example,), str(out), input_names=["image"], output_names=["logits"],
                          external_data=False, verbose=False)
    proto = onnx.load(str(out))
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(out))

    check = torch.randn(3, 3, image_size, image_size)  # another batch size than the example: N is dynamic
    got = torch.from_numpy(onnx_session(out, torch.get_num_threads()).run(["logits"], {"image": check.numpy()})[0])
    with torch.no_grad():
        want = model(check)
    return float((got - want).abs().max() / want.abs().max())


def onnx_session(path: Path, threads: int):
    """An onnxruntime CPU session with `threads` intra-op threads (ORT's default graph optimisations)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def median_seconds(call, repeats: int) -> float:
    """Median wall time of `call()` over `repeats` runs, after one untimed run."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def batch1_latency(model: nn.Module, out: Path, image_size: int, threads: int) -> tuple[float, float]:
    """(onnxruntime, PyTorch eager) median seconds for one image."""
    session = onnx_session(out, threads)
    image = torch.randn(1, 3, image_size, image_size)
    feed = {"image": image.numpy()}
    with torch.inference_mode():
        eager = median_seconds(lambda: model(image), LATENCY_REPEATS)
    return median_seconds(lambda: session.run(["logits"], feed), LATENCY_REPEATS), eager


def main(args: argparse.Namespace, log: RunLog) -> None:
    cfg = load_config(args.config, [NO_DATA_ROOT, *args.overrides])
    checkpoint, out = Path(args.checkpoint), Path(args.out)
    check_checkpoint_file(checkpoint)  # before anything is built: a wrong path fails at once
    if args.format == "safetensors" and out.suffix != ".safetensors":
        raise UserError(f"--out {out}: a safetensors file must end in .safetensors (timm picks the reader by it)")
    if args.fp16 and args.format != "onnx":
        raise UserError("--fp16 applies to --format onnx only")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    torch.set_num_threads(cfg["train"]["cpu_threads"] or torch.get_num_threads())

    model = build(cfg["model"], checkpoint, cfg["num_classes"])
    classes = model.state_dict()[classifier_key(model)].shape[0]
    metadata = {**preprocessing(cfg), "num_classes": str(classes)}
    if args.format == "safetensors":
        export_safetensors(model, out, metadata)
        overlay = f"file={str(out)!r}" + (f", num_classes={classes}" if classes != 1000 else "")
        extra = f", num_classes={classes}" if classes != 1000 else ""
        log.info(f"wrote {out} ({cfg['model']}, {classes} classes); load it with timm.create_model("
                 f"{cfg['model']!r}, pretrained=True, pretrained_cfg_overlay=dict({overlay}){extra})")
        return
    size = cfg["data"]["image_size"]
    tolerance = FP16_TOLERANCE if args.fp16 else TOLERANCE
    error = export_onnx(model, out, size, {**metadata, "dtype": "float16" if args.fp16 else "float32"}, args.fp16)
    if not error <= tolerance:
        raise SystemExit(f"error: {out}: onnxruntime's logits differ from PyTorch's by {error:.2e} of the largest "
                         f"logit (tolerance {tolerance:g})")
    log.info(f"wrote {out} ({cfg['model']}, {classes} classes, input (N, 3, {size}, {size})"
             f"{', float16 inside' if args.fp16 else ''}); onnxruntime matches PyTorch within {error:.1e} of the "
             f"largest logit")
    threads = torch.get_num_threads()
    ort_s, torch_s = batch1_latency(model, out, size, threads)
    log.info(f"latency at batch 1 ({threads} threads, median of {LATENCY_REPEATS}): onnxruntime "
             f"{ort_s * 1e3:.1f} ms, PyTorch eager {torch_s * 1e3:.1f} ms")


if __name__ == "__main__":
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="our .pth or the authors' release")
    parser.add_argument("--format", required=True, choices=("onnx", "safetensors"))
    parser.add_argument("--out", required=True, help="file to write (.onnx or .safetensors)")
    parser.add_argument("--fp16", action="store_true", help="onnx: compute in float16 (input and logits stay "
                        "float32)")
    parser.add_overrides()
    run_log = RunLog(0, 1)
    run_main(lambda: main(parser.parse_args(), run_log), run_log)
