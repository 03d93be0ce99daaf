#!/usr/bin/env bash
# The first contact with a GPU machine, in one command, inside a time budget: set up from the carried
# wheels, train for real (`flashnet train`, through submitit's local launcher) on a few shards of the
# generated sample data in bf16 (torch.compile on, killed after its first resume checkpoint and run
# again, which must resume from it) and in fp16 (nvJPEG decoding), then `flashnet bench gpu`
# with what is left of the budget. Prints where the results are.
#
#   scripts/gpu-first-contact.sh BUDGET_SECONDS [RESULTS_DIR]
#
# RESULTS_DIR defaults to $OUT (the device tool's folder that comes back) or ./first-contact. It gets at
# most 8 files, none in subfolders (the device tool returns 8): first-contact.log, train-bf16.log,
# train-fp16.log, summary-bf16.json, summary-fp16.json, gpu.json, gpu.md.
#
# Needs: Python 3.12 with torch, torchvision and pytorch-lightning (the GPU machine's image); the
# wheels in .whl/ from scripts/gpu-bench-prepare.sh (run where PyPI is reachable, then carry .whl);
# one CUDA GPU. On the device tool: carry [".whl"], timeout_s 600, command
#   scripts/gpu-first-contact.sh 540
#
# FLASHNET_FIRST_CONTACT_DRY=1: the same steps on the CPU, small (ResNet-18 at 32 px, fp32, the benchmark's
# --smoke), with this checkout's Python and no wheels: what tests/bench/gpu/test_first_contact.py runs.
set -uo pipefail

BUDGET=${1:?usage: scripts/gpu-first-contact.sh BUDGET_SECONDS [RESULTS_DIR]}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RESULTS=${2:-${OUT:-$PWD/first-contact}}
DRY=${FLASHNET_FIRST_CONTACT_DRY:-0}
WORK=${FLASHNET_FIRST_CONTACT_WORK:-$(mktemp -d -t flashnet-first-contact-XXXXXX)}
START=$SECONDS
mkdir -p "$RESULTS" "$WORK"
LOG=$RESULTS/first-contact.log
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1

say() { echo "[first-contact $(date -u +%H:%M:%S), $((SECONDS - START)) s] $*"; }
left() { echo $((BUDGET - (SECONDS - START))); }
fail() { say "FAILED: $*"; say "results so far: $RESULTS"; exit 1; }

# --- setup ------------------------------------------------------------------------------------------
if [[ $DRY == 1 ]]; then
    PYTHON=${PYTHON:-python3}
    ACCELERATOR=cpu MODEL=resnet18 IMAGE=32 BATCH=8 BF16=32-true FP16=32-true DECODE=cpu COMPILE=false
    CLASSES=4 PER_CLASS=16 CPUS=1 PER_SHARD=16
    BENCH_ARGS=(--smoke --configs 5,2,4 --batch-sizes 32)
    export PYTHONPATH=$ROOT/workflow${PYTHONPATH:+:$PYTHONPATH}
else
    PYTHON=${PYTHON:-python3}
    ACCELERATOR=gpu MODEL=resnet50 IMAGE=224 BATCH=32 BF16=bf16-mixed FP16=16-mixed DECODE=cuda COMPILE=true
    CLASSES=10 PER_CLASS=48 CPUS=4 PER_SHARD=64  # 480 images: 15 steps an epoch at batch 32, as a record's epoch
    BENCH_ARGS=(--make-shards 2048 --shards "$WORK/bench-shards/manifest.json")
    shopt -s nullglob
    wheels=("$ROOT"/.whl/*.whl)
    shopt -u nullglob
    ((${#wheels[@]})) || fail "no wheels in $ROOT/.whl: run scripts/gpu-bench-prepare.sh where PyPI is reachable, carry .whl"
    say "installing ${#wheels[@]} carried wheels into $WORK/site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
        "${wheels[@]}" || fail "pip install of the carried wheels"
    export PYTHONPATH=$WORK/site:$ROOT/workflow
    nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit --format=csv || fail "nvidia-smi"
fi
FLASHNET=("$PYTHON" -m flashnet)
"$PYTHON" -c "import flashnet.train.launch, flashnet.bench.gpu.cli, torch, torchvision, pytorch_lightning as pl; \
print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'lightning', pl.__version__, \
'cuda', torch.cuda.is_available())" || fail "the project does not import (a wheel missing? scripts/gpu_wheels.py)"

# --- a few shards of the generated sample data ------------------------------------------------------
say "sample data and shards in $WORK/data"
"${FLASHNET[@]}" sample-data "$WORK/data/source" --classes $CLASSES --train-per-class $PER_CLASS --val-per-class 4 \
    --seed 0 >/dev/null || fail "sample-data"
for split in train val; do
    "${FLASHNET[@]}" index "$WORK/data/source" --split $split --samples-per-shard $PER_SHARD --seed 0 \
        --out "$WORK/data/$split/index.json" >/dev/null || fail "index $split"
    "${FLASHNET[@]}" write-shards "$WORK/data/$split/index.json" --part 0 --parts 1 \
        --out "$WORK/data/$split/parts/0.json" >/dev/null || fail "write-shards $split"
    "${FLASHNET[@]}" manifest "$WORK/data/$split/index.json" --parts "$WORK/data/$split/parts/0.json" \
        --max-rejected 10 --out "$WORK/data/$split/manifest.json" >/dev/null || fail "manifest $split"
done

# The run's settings: the schema's defaults with these (flashnet.config validates them).
run_json() {  # precision decode_device compile epochs
    "$PYTHON" - "$@" <<EOF
import json, sys
from flashnet.bench.gpu.project import schema_run_defaults
from flashnet.config import RunConfig
precision, decode, compile_, epochs = sys.argv[1:]
run = {**schema_run_defaults(), "model": "$MODEL", "image_size": $IMAGE, "batch_size": $BATCH, "nodes": 1,
       "devices_per_node": 1, "accelerator": "$ACCELERATOR", "precision": precision, "decode_device": decode,
       "compile": compile_ == "true", "epochs": float(epochs), "warmup_epochs": 1, "loader_workers": 2,
       "checkpoint_every_minutes": 0, "log_every_steps": 5}  # 0: a checkpoint at every check (every 5 steps)
print(json.dumps(RunConfig.from_dict(run, "first-contact").to_dict()))
EOF
}
LAUNCHER="{\"cluster\": \"local\", \"timeout_min\": 30, \"cpus_per_task\": $CPUS}"

train() {  # name run_json seconds
    local name=$1 run=$2 seconds=$3
    timeout -s TERM "$seconds" "${FLASHNET[@]}" train --name "$name" --run "$run" --launcher "$LAUNCHER" \
        --train-manifest "$WORK/data/train/manifest.json" --val-manifest "$WORK/data/val/manifest.json" \
        --out-dir "$WORK/runs/$name" >>"$RESULTS/train-$name.log" 2>&1
}

# --- bf16: killed after its first resume checkpoint, then run again: it must resume --------------------
RUN_BF16=$(run_json "$BF16" cpu "$COMPILE" 3) || fail "bf16 run settings"
say "train bf16 ($BF16, compile $COMPILE): first attempt, stopped at its first resume checkpoint"
setsid "${FLASHNET[@]}" train --name bf16 --run "$RUN_BF16" --launcher "$LAUNCHER" \
    --train-manifest "$WORK/data/train/manifest.json" --val-manifest "$WORK/data/val/manifest.json" \
    --out-dir "$WORK/runs/bf16" >>"$RESULTS/train-bf16.log" 2>&1 &
first=$!
deadline=$((SECONDS + $(left) / 3))
until [[ -e $WORK/runs/bf16/checkpoints/last.ckpt ]] || ! kill -0 $first 2>/dev/null || ((SECONDS > deadline)); do
    sleep 1
done
[[ -e $WORK/runs/bf16/checkpoints/last.ckpt ]] || { kill -KILL -- -$first 2>/dev/null; fail "no resume checkpoint (train-bf16.log)"; }
sleep 1  # the checkpoint is renamed into place when complete; kill the whole process group (the local job too)
kill -KILL -- -$first 2>/dev/null
wait $first 2>/dev/null
say "train bf16: second attempt, from the checkpoint"
train bf16 "$RUN_BF16" $(($(left) / 2)) || fail "bf16 resumed run (train-bf16.log)"
grep -q "resuming from" "$RESULTS/train-bf16.log" || fail "the second bf16 attempt did not resume"
cp "$WORK/runs/bf16/summary.json" "$RESULTS/summary-bf16.json"

# --- fp16 with nvJPEG decoding (CPU decoding in the dry run) ------------------------------------------
RUN_FP16=$(run_json "$FP16" "$DECODE" false 2) || fail "fp16 run settings"
say "train fp16 ($FP16, decode_device $DECODE)"
train fp16 "$RUN_FP16" $(($(left) / 2)) || fail "fp16 run (train-fp16.log)"
cp "$WORK/runs/fp16/summary.json" "$RESULTS/summary-fp16.json"

# --- the benchmark, with what is left (a margin for its last configuration and the copy back) -------
bench_budget=$(($(left) * 2 / 3))
((bench_budget > 30)) || fail "no time left for the benchmark"
say "flashnet bench gpu: --time-budget $bench_budget"
"${FLASHNET[@]}" bench gpu "${BENCH_ARGS[@]}" --time-budget "$bench_budget" --out "$RESULTS" \
    || say "the benchmark reported failed configurations (gpu.md says which)"

say "done in $((SECONDS - START)) s of $BUDGET. Results in $RESULTS:"
ls -l "$RESULTS"
