#!/usr/bin/env bash
# The GPU suite: one command for a lent GPU machine without internet (benchmarks/README.md, "The GPU suite").
#
#   benchmarks/gpu_suite.sh [--dry-run]
#
# From the repository root, with .whl/ made by benchmarks/make_wheels.sh beside it. In order: install the carried
# wheels into /tmp/site; print the image's versions and the GPU; run the gpu-marked tests; bench_memory (full, lora,
# lora_fused, peft at 1b and 8b, seq 2048, ZeRO-2, gradient checkpointing on; the first case JIT-builds FusedAdam);
# bench_lora_matmul (every shape); bench_cross_entropy (--quick); the SFT demo once (configs/sft_tiny.yaml, W&B
# disabled). Every step has a time limit and together they stop within SUITE_BUDGET_S, so one hang cannot eat the
# budget; a failed step is noted and the suite goes on. Expected ~8 minutes on one H100/H200 (estimated from the
# H100 timings of 2026-11-23: bench_memory ~4.5 min, the kernel benches ~2 min, the demo ~1 min; not yet timed whole).
#
# Writes to $OUT (default benchmarks/results), named by device (TAG, e.g. h200): <bench>_<TAG>.{json,md,png},
# gpu_tests_<TAG>.xml, demo_sft_<TAG>_summary.json (+ _metrics.jsonl), versions_<TAG>.txt, gpu_suite_<TAG>.log.
#
# --dry-run prints the commands instead of running them (no GPU needed).
#
# Environment (all optional):
#   OUT                results folder, default benchmarks/results
#   TAG                device name in the file names, default from nvidia-smi (NVIDIA H200 -> h200)
#   PYTHON             interpreter, default python3
#   SUITE_BUDGET_S     seconds for the whole suite, default 540 (a device command may run 600 s)
#   SCRATCH            scratch folder for the demo's checkpoints, default /tmp/gpu_suite
#   LORA_MATMUL_ARGS   extra flags for bench_lora_matmul, default none (the full sweep); e.g. --quick
#   CE_ARGS            flags for bench_cross_entropy, default --quick; empty for the full sweep
#   MEMORY_ARGS        flags for bench_memory, default the sweep above
#   MEMORY_BUDGET_MIN  minutes after which bench_memory starts no case (default 4.5; the rest are recorded as skipped)
#   DEMO_OVERRIDES     extra config overrides of the demo, default train.gradient_accumulation_steps=2 (global
#                      batch 64 on one GPU, as the CPU reference's 2 ranks x 32)
set -uo pipefail

dry=0
for arg in "$@"; do
    case $arg in
        --dry-run) dry=1 ;;
        -h | --help)
            awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"
            exit 0
            ;;
        *)
            echo "gpu_suite.sh: unknown argument $arg (try --help)" >&2
            exit 2
            ;;
    esac
done

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results}
SCRATCH=${SCRATCH:-/tmp/gpu_suite}
budget=${SUITE_BUDGET_S:-540}
start=$SECONDS
if [[ -z ${TAG:-} ]]; then
    name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
    TAG=$(echo "${name:-gpu}" | tr '[:upper:]' '[:lower:]' | sed 's/^nvidia //' | grep -oE '[a-z]*[0-9]+[a-z0-9]*' | head -n 1)
    TAG=${TAG:-gpu}
fi

export TORCH_CUDA_ARCH_LIST=9.0 # DeepSpeed's JIT builder cannot parse the image's 9.0a (H100/H200)
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
# Our kernels import as distributed_pt_kernels (setup.py maps kernels/ to that name; the repo is not installed here).
((dry)) || { mkdir -p /tmp/site && ln -sfn "$PWD/kernels" /tmp/site/distributed_pt_kernels; }
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}

statuses=()
log=$OUT/gpu_suite_$TAG.log

# step NAME SECONDS CMD...: run CMD with at most SECONDS (less when the suite's budget is nearly spent), record its
# status, go on whatever it returns.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((budget - (SECONDS - start)))
    ((limit > left)) && limit=$left
    if ((dry)); then
        printf '[%s, %s s] ' "$name" "$limit"
        printf '%q ' "$@"
        echo
        return 0
    fi
    if ((limit < 10)); then
        statuses+=("$name: skipped (suite budget of $budget s spent)")
        echo "== $name: skipped, suite budget spent" | tee -a "$log"
        return 0
    fi
    echo "== $name (limit $limit s): $*" | tee -a "$log"
    local t0=$SECONDS rc
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    local what="ok"
    ((rc == 124 || rc == 137)) && what="timed out"
    ((rc != 0 && rc != 124 && rc != 137)) && what="failed (exit $rc)"
    statuses+=("$name: $what in $((SECONDS - t0)) s")
}

# by_device BENCH: <bench>.{json,md,png} in $OUT become <bench>_<TAG>.* (records renamed, views rendered again).
by_device() {
    local bench=$1
    if ((dry)); then
        echo "rename $OUT/$bench.{json,md,png} -> $OUT/${bench}_$TAG.{json,md,png}"
        return 0
    fi
    [[ -f $OUT/$bench.json ]] || return 0
    "$PY" - "$OUT/$bench.json" "$TAG" <<'EOF'
import json
import sys
from pathlib import Path

from benchmarks.harness import render

src, tag = Path(sys.argv[1]), sys.argv[2]
records = json.loads(src.read_text())
name = f"{records[0]['bench']}_{tag}"
for r in records:
    r["bench"] = name
dst = src.with_name(f"{name}.json")
dst.write_text(json.dumps(records, indent=1) + "\n")
render(dst)
for suffix in (".json", ".md", ".png"):
    src.with_suffix(suffix).unlink(missing_ok=True)
EOF
}

if ((!dry)); then
    mkdir -p "$OUT" "$SCRATCH"
    : >"$log"
fi

# 1. Carried packages (deepspeed, datasets, liger-kernel; benchmarks/make_wheels.sh).
if compgen -G ".whl/*.whl" >/dev/null || ((dry)); then
    step install_wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
else
    echo "gpu_suite.sh: no .whl/ here (run benchmarks/make_wheels.sh on a machine with internet); using the image's" \
        "packages" | tee -a "$log"
fi

# 2. The image: versions and the GPU (also to versions_<TAG>.txt).
versions_py='import sys, torch, triton, transformers, peft
from importlib import metadata
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda, "| triton",
      triton.__version__, "| transformers", transformers.__version__, "| peft", peft.__version__)
for pkg in ("deepspeed", "datasets", "liger-kernel", "flash-attn", "wandb"):
    try:
        print(pkg, metadata.version(pkg))
    except metadata.PackageNotFoundError:
        print(pkg, "not installed")
print("gpu:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")'
step versions 60 bash -c '{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$1" -c "$2"; "$1" -m pip list 2>/dev/null; } 2>&1 | tee "$3"' versions "$PY" "$versions_py" "$OUT/versions_$TAG.txt"

# 3. The gpu-marked tests (tests/conftest.py skips them without a GPU). Only the files that hold some are collected,
# so a test module importing what the image lacks (e.g. wandb) cannot stop them.
mapfile -t gpu_files < <(grep -rlE "mark\.gpu" tests --include="*.py" | sort)
step gpu_tests 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors \
    --junitxml="$OUT/gpu_tests_$TAG.xml" "${gpu_files[@]}"

# 4. One SFT step side by side: full / our LoRA (torch, kernels) / PEFT. It starts no case after MEMORY_BUDGET_MIN
# minutes and kills a case after --case-timeout, so it ends in time for the steps after it; it never raises on a case.
mem_flags=${MEMORY_ARGS:-"--sizes 1b,8b --seq 2048 --micro-batch 1 --zero 2 --checkpointing on --offload off \
--modes full,lora,lora_fused,peft --case-timeout 120 --budget-min ${MEMORY_BUDGET_MIN:-4.5}"}
read -r -a mem_args <<<"$mem_flags"
step bench_memory 420 "$PY" -m benchmarks.bench_memory "${mem_args[@]}" --out "$OUT" --name "bench_memory_$TAG"

# 5. Kernel benches.
read -r -a lora_args <<<"${LORA_MATMUL_ARGS:-}"
step bench_lora_matmul 150 "$PY" -m benchmarks.bench_lora_matmul "${lora_args[@]}" --out "$OUT"
by_device bench_lora_matmul
ce_flags=${CE_ARGS-"--quick"}
read -r -a ce_args <<<"$ce_flags"
step bench_cross_entropy 90 "$PY" -m benchmarks.bench_cross_entropy "${ce_args[@]}" --out "$OUT"
by_device bench_cross_entropy

# 6. The SFT demo once (checkpoints in $SCRATCH; its summary and metrics to $OUT).
demo_flags=${DEMO_OVERRIDES-"train.gradient_accumulation_steps=2"}
read -r -a demo_over <<<"$demo_flags"
step demo_sft 150 env DEEPSPEED="$PY -m deepspeed.launcher.runner" launch/single_node.sh configs/sft_tiny.yaml \
    logging.wandb_mode=disabled output_dir="$SCRATCH/demo_sft" "${demo_over[@]}"
if ((dry)); then
    echo "copy $SCRATCH/demo_sft/summary.json -> $OUT/demo_sft_${TAG}_summary.json"
else
    cp "$SCRATCH/demo_sft/summary.json" "$OUT/demo_sft_${TAG}_summary.json" 2>/dev/null
    cp "$SCRATCH/demo_sft/metrics.jsonl" "$OUT/demo_sft_${TAG}_metrics.jsonl" 2>/dev/null
fi

if ((!dry)); then
    {
        echo
        echo "== gpu_suite.sh on $TAG: $((SECONDS - start)) s"
        printf '  %s\n' "${statuses[@]}"
    } | tee -a "$log"
    ls -l "$OUT"
fi
