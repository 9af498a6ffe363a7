"""The run configuration: one schema with every key, its default and what it allows.

A run is `--config PATH` (YAML) plus dotted `key=value` overrides (values parsed as YAML), merged onto the
defaults below. A config file may name a `base:` file (relative to itself) whose values it overrides.
Every problem is a `ConfigError` with a one-line message naming the key: an unknown key names the closest
valid one, a bad value says what is allowed. The result is a plain nested dict
(`cfg["optim"]["lr"]`), which is what gets written to `output_dir/config.yaml` and into checkpoints.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import UserError

if TYPE_CHECKING:
    import torch


class ConfigError(UserError):
    """A bad config file, key or value; the message is one line naming it."""


@dataclass(frozen=True)
class Option:
    default: Any
    kind: type  # int, float, bool, str or list (of ints)
    help: str
    choices: tuple[str, ...] | Callable[[], Sequence[str]] | None = None
    minimum: float | None = None
    maximum: float | None = None
    nullable: bool = False


def _timm_optimizers() -> list[str]:
    from timm.optim import list_optimizers

    return list_optimizers()


def _model_names() -> list[str]:
    from models import list_models

    return list_models()


AMP_CHOICES = ("bf16", "fp16", "off")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# Defaults in one place. The paper recipe (configs/paper.yaml) spells out its values explicitly on top of these.
SCHEMA: dict[str, Option] = {
    "model": Option("lip_resnet50", str, "model name (models.create_model)", choices=_model_names),
    "num_classes": Option(None, int, "classifier outputs; null = number of class folders in the data",
                          minimum=1, nullable=True),
    "seed": Option(0, int, "seed of the data order, augmentation and init", minimum=0),
    "output_dir": Option(None, str, "run folder; null = runs/<config file name>", nullable=True),
    "data.root": Option(None, str, "dataset root holding train/<wnid>/ and val/<wnid>/", nullable=True),
    "data.backend": Option("torchvision", str, "input pipeline", choices=("dali", "dali_cpu", "torchvision")),
    "data.workers": Option(None, int, "loader threads/processes per rank; null = the CPUs this job may use "
                           "(affinity, SLURM allocation) shared among the ranks of the node", minimum=0,
                           nullable=True),
    "data.image_size": Option(224, int, "train crop size (the final one with progressive resizing)", minimum=8),
    "data.val_image_size": Option(None, int, "val center-crop size; null = data.image_size", minimum=8,
                                  nullable=True),
    "data.val_resize": Option(256, int, "val: shorter side resized to this before the center crop", minimum=8),
    "data.progressive.start_size": Option(None, int, "progressive resizing: train size up to start_epoch; "
                                          "null = off (always data.image_size)", minimum=8, nullable=True),
    "data.progressive.start_epoch": Option(0, int, "progressive resizing: last epoch at start_size", minimum=0),
    "data.progressive.end_epoch": Option(0, int, "progressive resizing: first epoch at data.image_size", minimum=0),
    "data.progressive.multiple": Option(32, int, "progressive resizing: sizes are rounded to a multiple of this",
                                        minimum=1),
    "data.cache_dir": Option(None, str, "file-index cache folder; null = the data package's default",
                             nullable=True),
    "train.epochs": Option(90, int, "epochs to train", minimum=1),
    "train.batch_size": Option(256, int, "GLOBAL batch size, split evenly across ranks", minimum=1),
    "train.amp": Option("off", str, "mixed precision (fp16 uses a GradScaler)", choices=AMP_CHOICES),
    "train.cpu_threads": Option(None, int, "torch threads per process on a CPU; null = torch's default (all cores, "
                                "or OMP_NUM_THREADS)", minimum=1, nullable=True),
    "train.channels_last": Option(True, bool, "channels_last memory format (applied on GPU only)"),
    "train.compile": Option(False, bool, "torch.compile the model (after channels_last, before DDP); the first "
                            "steps and evaluations are slower while it compiles"),
    "train.compile_mode": Option(None, str, "torch.compile mode; null = torch's default", nullable=True,
                                 choices=COMPILE_MODES),
    "train.deterministic": Option(False, bool, "reproducible GPU reruns: deterministic cuDNN/cuBLAS algorithms, "
                                  "no cudnn.benchmark, no TF32 (slower)"),
    "train.tf32": Option(True, bool, "TF32 for fp32 matmuls and convolutions on a GPU (what runs with "
                         "train.amp=off); false = true fp32"),
    "train.log_every": Option(50, int, "steps between train.log lines and TensorBoard train scalars", minimum=1),
    "train.label_smoothing": Option(0.0, float, "label smoothing of the cross-entropy loss; 0 = off", minimum=0.0,
                                   maximum=0.99),
    "train.mixup_alpha": Option(0.0, float, "timm Mixup alpha; 0 = off", minimum=0.0),
    "train.cutmix_alpha": Option(0.0, float, "timm CutMix alpha; 0 = off", minimum=0.0),
    "train.ema_decay": Option(0.0, float, "timm ModelEmaV3 decay per step; 0 = off", minimum=0.0, maximum=0.999999),
    "optim.name": Option("momentum", str, "timm optimizer name ('momentum' = SGD without Nesterov)",
                         choices=_timm_optimizers),
    "optim.lr": Option(0.1, float, "learning rate for a global batch of 256, scaled linearly", minimum=0.0),
    "optim.momentum": Option(0.9, float, "momentum", minimum=0.0, maximum=1.0),
    "optim.weight_decay": Option(1e-4, float, "weight decay", minimum=0.0),
    "optim.filter_bias_and_bn": Option(False, bool, "exempt biases and norm weights from weight decay"),
    "sched.name": Option("step", str, "lr schedule: step (sched.milestones/gamma, the paper's) or cosine (timm's "
                         "CosineLRScheduler per step down to sched.min_lr)", choices=("step", "cosine")),
    "sched.milestones": Option([30, 60, 80], list, "epochs at which the lr is multiplied by sched.gamma"),
    "sched.gamma": Option(0.1, float, "lr decay factor at each milestone", minimum=0.0),
    "sched.min_lr": Option(0.0, float, "cosine: lr at the end of the last epoch", minimum=0.0),
    "sched.warmup_epochs": Option(0, int, "linear lr warmup from 0 over this many epochs (per step)", minimum=0),
    "checkpoint.every_steps": Option(1000, int, "steps between checkpoints/last.pth writes; 0 = epoch ends only",
                                     minimum=0),
    "tb.num_images": Option(8, int, "fixed val images whose LIP importance maps go to TensorBoard; 0 = off",
                            minimum=0),
    "debug.nan_at_step": Option(None, int, "TEST ONLY: make the loss NaN at this global step (exercises the "
                                "non-finite guard)", minimum=0, nullable=True),
}


def _describe(opt: Option) -> str:
    """What a key allows, for error messages."""
    if opt.choices is not None:
        choices = opt.choices() if callable(opt.choices) else opt.choices
        if len(choices) > 12:
            return "one of the names in timm.optim.list_optimizers()"
        return "one of " + ", ".join(choices)
    kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            list: "a list of integers"}[opt.kind]
    if opt.minimum is not None and opt.maximum is not None:
        kind += f" in [{opt.minimum}, {opt.maximum}]"
    elif opt.minimum is not None:
        kind += f" >= {opt.minimum}"
    return kind + (" or null" if opt.nullable else "")


def _check_value(key: str, value: Any, where: str) -> Any:
    """The value converted to the key's type, or a ConfigError saying what is allowed."""
    opt = SCHEMA[key]
    bad = ConfigError(f"{key}={value!r} ({where}) is not allowed: expected {_describe(opt)}")
    if value is None:
        if opt.nullable:
            return None
        raise bad
    if opt.kind is str and value is False and opt.choices == AMP_CHOICES:
        value = "off"  # YAML 1.1 reads a bare `off` as false
    if opt.kind is float and isinstance(value, str):
        try:  # PyYAML reads `1e-4` (no dot) as a string
            value = float(value)
        except ValueError:
            raise bad from None
    if opt.kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise bad
        value = float(value)
    elif opt.kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif opt.kind is list:
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise bad
        value = list(value)
    elif not isinstance(value, opt.kind):
        raise bad
    if opt.choices is not None:
        choices = opt.choices() if callable(opt.choices) else opt.choices
        if value not in choices:
            raise bad
    if isinstance(value, int | float) and not isinstance(value, bool) and (
            (opt.minimum is not None and value < opt.minimum) or (opt.maximum is not None and value > opt.maximum)):
        raise bad
    return value


def _unknown(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, SCHEMA, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(SCHEMA)}"
    return ConfigError(f"unknown config key '{key}' ({where}){hint}")


def _flatten(tree: Mapping[str, Any], where: str, prefix: str = "") -> dict[str, Any]:
    """Nested YAML mapping -> {dotted key: value}; sections must be mappings, leaves must be known keys."""
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if key in SCHEMA:
            flat[key] = value
        elif isinstance(value, Mapping) and any(k.startswith(key + ".") for k in SCHEMA):
            flat.update(_flatten(value, where, key + "."))
        else:
            raise _unknown(str(key), where)
    return flat


def _read_yaml(path: Path) -> Mapping[str, Any]:
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a YAML config file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a YAML config file (not UTF-8 text)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{at} is not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if tree is None:
        return {}
    if not isinstance(tree, Mapping):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return tree


def _read_config(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, tuple[Any, str]]:
    """{dotted key: (value, file it came from)} of a config file over its `base:` chain.

    `base: other.yaml` (relative to the including file) lets the six paper configs share one recipe and
    differ in the model alone; a key in the including file wins over its base.
    """
    here = path.resolve()
    if here in chain:
        cycle = " -> ".join(str(p) for p in (*chain[chain.index(here):], here))
        raise ConfigError(f"{path}: config files include each other through base: {cycle}")
    tree = dict(_read_yaml(path))
    base = tree.pop("base", None)
    values: dict[str, tuple[Any, str]] = {}
    if base is not None:
        if not isinstance(base, str) or not base:
            raise ConfigError(f"{path}: base={base!r} is not allowed: expected the path of another config file")
        base_path = path.parent / base
        if not base_path.is_file():
            raise ConfigError(f"{path}: base config file not found: {base_path}")
        values.update(_read_config(base_path, (*chain, here)))
    values.update({key: (value, str(path)) for key, value in _flatten(tree, str(path)).items()})
    return values


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. train.epochs=2)")
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        raise ConfigError(f"override '{text}': value '{raw}' is not valid YAML") from None
    return key.strip(), value


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *sections, leaf = key.split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return tree


def resolve_values(path: str | Path | None, overrides: Sequence[str] = ()) -> tuple[dict[str, Any], dict[str, str]]:
    """Defaults <- YAML file (and its bases) <- `key=value` overrides, each value checked: the flat
    {dotted key: value} and where each value came from ('default', a file, 'command line')."""
    values: dict[str, Any] = {key: opt.default for key, opt in SCHEMA.items()}
    sources: dict[str, str] = {}
    if path is not None:
        for key, (value, where) in _read_config(Path(path)).items():
            values[key], sources[key] = value, where
    for text in overrides:
        key, value = _parse_override(text)
        if key not in SCHEMA:
            raise _unknown(key, "command line")
        values[key], sources[key] = value, "command line"
    for key in SCHEMA:
        values[key] = _check_value(key, values[key], sources.get(key, "default"))
    return values, sources


def load_config(path: str | Path | None, overrides: Sequence[str] = (), require_data: bool = True) -> dict[str, Any]:
    """Defaults <- YAML file <- `key=value` overrides, checked; returns the resolved nested config.
    `require_data=False` is for tools that read no dataset (data.root may then stay unset)."""
    values, _ = resolve_values(path, overrides)
    if require_data and values["data.root"] is None:
        raise ConfigError("data.root is not set: give it in the config or as data.root=/path/to/imagenet")
    milestones = values["sched.milestones"]
    if any(m < 0 for m in milestones) or milestones != sorted(milestones):
        raise ConfigError(f"sched.milestones={milestones} is not allowed: expected increasing epochs >= 0")
    if values["sched.name"] == "cosine" and values["sched.warmup_epochs"] >= values["train.epochs"]:
        raise ConfigError(f"sched.warmup_epochs={values['sched.warmup_epochs']} leaves no epoch for the cosine "
                          f"decay of train.epochs={values['train.epochs']}")
    if values["output_dir"] is None:
        values["output_dir"] = _default_output_dir(path)
    return _nest(values)


def _default_output_dir(path: str | Path | None) -> str:
    """runs/<config file name>: each model config of the paper recipe gets its own run folder."""
    return str(Path("runs") / (Path(path).stem if path is not None else "default"))


def check_world_size(cfg: Mapping[str, Any], world_size: int) -> int:
    """The per-rank batch size; the global `train.batch_size` must split evenly across the ranks."""
    batch = cfg["train"]["batch_size"]
    if batch % world_size:
        raise ConfigError(f"train.batch_size={batch} does not split evenly across {world_size} ranks; "
                          f"use a multiple of {world_size}")
    per_rank = batch // world_size
    if (cfg["train"]["mixup_alpha"] > 0 or cfg["train"]["cutmix_alpha"] > 0) and per_rank % 2:
        raise ConfigError(f"train.batch_size={batch} gives {per_rank} images per rank; mixup/cutmix need an even "
                          "number per rank")
    return per_rank


def use_channels_last(cfg: Mapping[str, Any], device: torch.device) -> bool:
    """Whether the model and its inputs go channels_last: train.channels_last, on a GPU only (CPU convolutions
    are slower in that layout). Decided here alone, for training, evaluation and every script."""
    return bool(cfg["train"]["channels_last"]) and device.type == "cuda"


def save_config(cfg: Mapping[str, Any], path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(dict(cfg), sort_keys=False))


def describe_keys(path: str | Path | None = None, overrides: Sequence[str] = ()) -> str:
    """Every key with its value and what it allows, for `--help`: the defaults, or with a config file the
    values it resolves to (bases and overrides applied) and where each came from."""
    values, sources = resolve_values(path, overrides)
    if path is not None and values["output_dir"] is None:
        values["output_dir"], sources["output_dir"] = _default_output_dir(path), "the config file's name"
    head = f"config keys as {path} resolves them" if path is not None else "config keys and their defaults"
    lines = [f"{head} (give as key=value after --config):"]
    for key, opt in SCHEMA.items():
        where = f" ({sources[key]})" if key in sources else ""
        lines.append(f"  {key} = {values[key]!r}{where}: {opt.help} [{_describe(opt)}]")
    return "\n".join(lines)
