#!/usr/bin/env bash
# Device check on a GPU machine, from the repository root:
#
#     bash scripts/gpu_check.sh            # logs also go to $OUT/ when OUT is set
#
# Uses the machine's own python3 (torch + triton, no .venv, nothing installed) with PYTHONPATH=. and runs
# each section below in order; a failing section is reported and the next one still runs. The exit status
# is that of the first failing section. Each section writes its output to $OUT/<section>.log as well.
# The whole run stays within BUDGET_S seconds (default 530, under a 9-minute device call): a section gets
# at most what is left, and one that would get under 20 s is skipped, so the sections last in the file
# are the first to drop.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
LOGS=${OUT:-}
[ -n "$LOGS" ] && mkdir -p "$LOGS"
status=0
BUDGET=${BUDGET_S:-530}

# section NAME TIMEOUT_S COMMAND...: runs COMMAND with a time limit, tees its output to $OUT/NAME.log.
section() {
    local name=$1 limit=$2 rc
    shift 2
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt 20 ]; then
        echo "=== $name: skipped, ${left} s of the ${BUDGET} s budget left ==="
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (limit ${limit} s): $* ==="
    local start=$SECONDS
    if [ -n "$LOGS" ]; then
        timeout "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
        rc=${PIPESTATUS[0]}
    else
        timeout "$limit" "$@" 2>&1
        rc=$?
    fi
    echo "=== $name: exit $rc after $((SECONDS - start)) s ==="
    [ "$rc" -ne 0 ] && [ "$status" -eq 0 ] && status=$rc
    return 0
}

# --- environment: GPU, driver, torch/triton versions
section environment 60 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; \
$PY -c 'import sys, torch, triton; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \
\"cuda\", torch.version.cuda, \"triton\", triton.__version__, \"device\", torch.cuda.get_device_name())'"

# --- every cuda-marked test (LIP: Triton kernels against float64, no host sync, Inductor, CUDA graph).
# Only the files that hold such tests are collected: others may import packages this machine lacks.
mapfile -t cuda_files < <(grep -l "pytest.mark.cuda" tests/*.py)
section cuda_tests 240 "$PY" -m pytest -q -m cuda -p no:cacheprovider "${cuda_files[@]}"

# --- LIP operator benchmark: forward, backward and forward+backward (CUDA events), effective bandwidth, peak
# memory, against avg_pool2d and torch.compile of the formula; bf16 channels_last and fp32 NCHW
section lip_bench 120 "$PY" scripts/bench_lip.py --device cuda

# --- each Triton tile configuration of models/lip_triton.py in turn, forward and backward: the fastest per row
section lip_tiles 60 "$PY" scripts/bench_lip.py --device cuda --tiles --repeats 7

# --- training step of each LIP network against its baseline, bf16 channels_last: img/s, peak memory, ratios,
# and where each step goes (the operators with the most GPU time, both models of each pair)
BENCH=(scripts/bench_train.py --device cuda --batch-size 256 --image-size 224 --steps 50 --amp bf16 --channels-last)
section bench_train_resnet50 150 "$PY" "${BENCH[@]}" --model lip_resnet50 --baseline resnet50 --profile 25
section bench_train_densenet121 120 "$PY" "${BENCH[@]}" --model lip_densenet121 --baseline densenet121 --profile 15

# --- what one training step must move and compute (fake tensors; same figures as on any CPU)
section step_traffic 45 "$PY" scripts/step_traffic.py --model lip_resnet50 --baseline resnet50 --batch-size 256 \
    --image-size 224 --amp bf16 --channels-last --top 15 --diff 20

# --- the demo trained for 2 epochs on the GPU (torchvision backend, bf16), then evaluated from its checkpoint
DEMO=${TMPDIR:-/tmp}/lip_gpu_demo
section demo_train 150 bash -c "rm -rf $DEMO && \
$PY scripts/make_demo_data.py --out $DEMO/data --classes 6 --train-per-class 100 --val-per-class 40 --seed 0 && \
$PY train.py --config configs/demo.yaml data.root=$DEMO/data output_dir=$DEMO/run data.cache_dir=$DEMO/cache \
    train.epochs=2 train.amp=bf16 && \
$PY eval.py --config configs/demo.yaml --checkpoint $DEMO/run/checkpoints/last.pth data.root=$DEMO/data \
    data.cache_dir=$DEMO/cache train.amp=bf16"

# --- last, as it is the first to drop when time is short: both ResNet-50s through torch.compile
section bench_train_resnet50_compiled 240 "$PY" "${BENCH[@]}" --model lip_resnet50 --baseline resnet50 --compile

exit "$status"
