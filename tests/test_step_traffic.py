"""scripts/step_traffic.py: counts equal a hand count on a tiny model, custom ops count their declared inputs
and outputs (and nothing their fake implementation runs), the final JSON's exact keys, one-line errors."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from train_utils import ENV, ROOT

from training.errors import UserError

_spec = importlib.util.spec_from_file_location("step_traffic", ROOT / "scripts" / "step_traffic.py")
step_traffic = sys.modules.setdefault("step_traffic", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(step_traffic)

KEYS = {"model", "baseline", "model_gb", "baseline_gb", "model_tflop", "baseline_tflop", "traffic_ratio",
        "roofline_ratio"}
F32 = 4  # bytes


@torch.library.custom_op("step_traffic_test::scaled_pair", mutates_args=())
def scaled_pair(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x * w, (x * w).sum(dim=1)


@scaled_pair.register_fake
def _scaled_pair_fake(x, w):
    # ops inside the fake implementation run below the counting mode: they must not be counted
    return (x * w).contiguous(), torch.empty_like(x).sum(dim=1)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))


def test_forward_of_a_tiny_model_equals_a_hand_count() -> None:
    counter = step_traffic.TrafficCounter()
    with FakeTensorMode():
        model, x = tiny_model(), torch.randn(2, 3, 4, 4)
        with counter:
            model(x)
    ops = counter.traffic.ops
    assert set(ops) == {"aten.convolution", "aten.addmm"}  # flatten and the weight's transpose are views
    conv_bytes = (2 * 3 * 4 * 4 + 4 * 3 * 3 * 3 + 2 * 4 * 4 * 4) * F32  # x, weight, output
    linear_bytes = (5 + 2 * 64 + 5 * 64 + 2 * 5) * F32  # bias, flattened input, weight, output
    assert (ops["aten.convolution"].bytes, ops["aten.addmm"].bytes) == (conv_bytes, linear_bytes)
    conv_flops = 2 * (2 * 4 * 4 * 4) * (3 * 3 * 3)  # 2 per multiply-add: output elements x (Cin k k)
    linear_flops = 2 * 2 * 64 * 5
    assert (ops["aten.convolution"].flops, ops["aten.addmm"].flops) == (conv_flops, linear_flops)
    assert counter.traffic.calls == 2 and counter.traffic.bytes == conv_bytes + linear_bytes
    roofline = conv_bytes / 3000e9 + linear_bytes / 3000e9  # both memory-bound at 400 TFLOP/s, 3 TB/s
    assert counter.traffic.seconds == pytest.approx(roofline)


def test_training_step_flops_equal_a_hand_count() -> None:
    traffic = step_traffic.count_step(tiny_model, batch_size=2, image_size=4, amp="off", channels_last=False)
    conv = 2 * (2 * 4 * 4 * 4) * (3 * 3 * 3)
    linear = 2 * 2 * 64 * 5
    # forward: conv + linear; backward: the linear's input and weight gradients, the conv's weight gradient
    # only (the images need none)
    assert traffic.flops == conv + linear + 2 * linear + conv
    assert traffic.ops["aten.convolution_backward"].flops == conv
    assert traffic.ops["aten.mm"].calls == 2 and traffic.ops["aten.mm"].flops == 2 * linear
    # SGD with momentum updates every parameter: weight decay, momentum and parameter update, all counted
    params = (4 * 3 * 3 * 3 + 5 * 64 + 5) * F32
    sgd = sum(t.bytes for op, t in traffic.ops.items() if op.startswith("aten._foreach"))
    assert sgd >= 7 * params  # reads grad, param, buffer, writes the decayed grad, buffer and param at least
    assert not any(op.startswith("prim.") for op in traffic.ops)
    # the passes split the same totals: forward, backward, and the optimizer's update
    assert sum(t.bytes for t in traffic.passes.values()) == traffic.bytes
    assert traffic.passes["forward", "aten.convolution"].flops == conv
    assert traffic.passes["backward", "aten.convolution_backward"].flops == conv
    assert {op for phase, op in traffic.passes if phase == "optimizer"} == {
        op for op in traffic.ops if op.startswith("aten._foreach")}


def test_custom_op_counts_its_declared_inputs_and_outputs_once() -> None:
    counter = step_traffic.TrafficCounter()
    with FakeTensorMode():
        x, w = torch.randn(3, 8), torch.randn(3, 8)
        with counter:
            scaled_pair(x, w)
    assert set(counter.traffic.ops) == {"step_traffic_test.scaled_pair"}
    op = counter.traffic.ops["step_traffic_test.scaled_pair"]
    assert op.calls == 1 and op.bytes == (3 * 8 + 3 * 8 + 3 * 8 + 3) * F32 and op.flops == 0


def test_lip_ops_count_their_declared_state() -> None:
    from models.lip import lip2d

    seen: dict[str, tuple[list, list]] = {}

    def key(func, inputs, outputs) -> str:
        name = str(func.overloadpacket)
        seen[name] = ([(tuple(t.shape), t.dtype) for t in inputs], [(tuple(t.shape), t.dtype) for t in outputs])
        return name

    counter = step_traffic.TrafficCounter(key=key)
    with FakeTensorMode():
        x = torch.randn(2, 4, 9, 9, dtype=torch.bfloat16).requires_grad_()
        s = torch.randn(2, 4, 9, 9, dtype=torch.bfloat16).requires_grad_()
        with counter:
            lip2d(x, s).sum().backward()
    ops = counter.traffic.ops
    assert ops["lip.forward"].calls == 1 and ops["lip.backward"].calls == 1
    ins, outs = seen["lip.forward"]
    assert ins == [((2, 4, 9, 9), torch.bfloat16)] * 2
    # the result and, among the state it declares for backward, the fp32 window sums: all counted
    assert outs[0] == ((2, 4, 5, 5), torch.bfloat16) and ((2, 4, 5, 5), torch.float32) in outs[1:]
    declared = sum(2 * torch.Size(shape).numel() if dtype == torch.bfloat16 else
                   torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size() for shape, dtype in outs)
    assert ops["lip.forward"].bytes == 2 * x.nbytes + declared
    ins, outs = seen["lip.backward"]
    assert outs[:2] == [((2, 4, 9, 9), torch.bfloat16)] * 2  # dx, ds
    assert ops["lip.backward"].bytes >= 4 * x.nbytes + 2 * 4 * 5 * 5 * 2  # x, s, dx, ds, the output gradient


def test_views_and_broadcasts_move_nothing_extra() -> None:
    counter = step_traffic.TrafficCounter()
    with FakeTensorMode():
        a, b = torch.randn(16, 32), torch.randn(32)
        with counter:
            a.t().contiguous()
            a + b.expand(16, 32)
    ops = counter.traffic.ops
    assert set(ops) == {"aten.clone", "aten.add"}
    assert ops["aten.clone"].bytes == 2 * 16 * 32 * F32
    assert ops["aten.add"].bytes == (16 * 32 + 32 + 16 * 32) * F32  # the expanded b is read once


def test_main_json_keys_and_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    summary = step_traffic.main(["--model", "lip_resnet_tiny", "--baseline", "resnet18", "--batch-size", "2",
                                 "--image-size", "32", "--amp", "bf16", "--nchw", "--top", "40", "--diff", "5"])
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result) == KEYS and result == summary
    assert (result["model"], result["baseline"]) == ("lip_resnet_tiny", "resnet18")  # resnet18: timm's own
    assert result["traffic_ratio"] == pytest.approx(result["model_gb"] / result["baseline_gb"], rel=1e-2)
    assert result["roofline_ratio"] > 0 and result["model_tflop"] > 0
    assert "lip_resnet_tiny:" in out and "resnet18:" in out and "lip.forward" in out
    assert "lip_resnet_tiny against resnet18: the 5 (pass, op) pairs" in out


def test_bf16_halves_the_activation_traffic_of_fp32() -> None:
    fp32 = step_traffic.count_step("resnet18", 4, 64, amp="off")
    bf16 = step_traffic.count_step("resnet18", 4, 64, amp="bf16")
    assert bf16.flops == fp32.flops
    assert 0.45 < bf16.ops["aten.convolution"].bytes / fp32.ops["aten.convolution"].bytes < 0.6


def test_unknown_model_is_a_user_error() -> None:
    with pytest.raises(UserError, match="unknown model 'no_such_net'"):
        step_traffic.count_step("no_such_net", 2, 32)


@pytest.mark.slow
@pytest.mark.parametrize("args, said", [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--model", "no_such_net"], "unknown model 'no_such_net'"),
    (["--channels-last", "--nchw"], "not allowed with argument"),
    (["--amp", "fp8"], "invalid choice"),
])
def test_cli_bad_arguments_are_one_line(args: list[str], said: str) -> None:
    proc = subprocess.run([sys.executable, "scripts/step_traffic.py", "--batch-size", "2", "--image-size", "32",
                           *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and said in lines[0], proc.stderr


@pytest.mark.slow
def test_cli_help_names_where_the_defaults_come_from() -> None:
    proc = subprocess.run([sys.executable, "scripts/step_traffic.py", "--help"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "H100/H200" in proc.stdout and "--nchw" in proc.stdout


@pytest.mark.slow
def test_bench_lip_times_each_direction_and_rates_it_by_the_counted_bytes() -> None:
    proc = subprocess.run([sys.executable, "scripts/bench_lip.py", "--shape", "2", "8", "17", "17", "--repeats", "2",
                           "--channels-last"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["channels_last"] and "perf_counter" in result["method"] and "perf_counter" in proc.stdout
    for name in ("avg_pool2d", "lip2d", "gated_lip2d", "naive"):
        assert all(result[f"{name}_{d}_ms"] > 0 for d in ("forward", "backward", "fwdbwd")), name
    assert result["ratio_lip2d"] == pytest.approx(result["lip2d_fwdbwd_ms"] / result["avg_pool2d_fwdbwd_ms"],
                                                  rel=1e-2)
    x, y = 2 * 8 * 17 * 17 * F32, 2 * 8 * 9 * 9 * F32
    moved = result["moved_bytes"]
    assert moved["avg_pool2d"] == [x + y, y + x]
    # forward reads x and the logit and writes at least the result and the fp32 window sums
    assert moved["lip2d"][0] >= 2 * x + 2 * y and moved["naive"] == moved["lip2d"]
    assert abs(result["lip2d_forward_gbps"] - moved["lip2d"][0] / result["lip2d_forward_ms"] / 1e6) <= 1
