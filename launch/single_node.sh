#!/usr/bin/env bash
# Train on one machine: every GPU it has, or 2 CPU ranks (gloo) when it has none.
#
#   launch/single_node.sh CONFIG [key.sub=value ...]
#   launch/single_node.sh configs/sft_tiny.yaml train.max_steps=100 output_dir=outputs/try
#   NUM_GPUS=4 MASTER_PORT=29611 launch/single_node.sh configs/sft_tiny.yaml
#
# Runs: deepspeed --num_gpus $NUM_GPUS --master_port $MASTER_PORT --module distributed_pt.train CONFIG [overrides]
# SIGTERM or Ctrl-C: every rank saves a checkpoint and exits; the script returns 143 once they are gone (launch/job.sh).
# Exit status: 0 done, 1 a training error, 2 a config or data error, 143 stopped by a signal with a checkpoint saved,
# 247 a rank was killed (SIGKILL, e.g. out of memory) and the others were stopped.
#
# Environment (all optional):
#   NUM_GPUS      ranks to start. Default: the GPUs `nvidia-smi -L` lists (or those in CUDA_VISIBLE_DEVICES, which
#                 are then passed as --include so the chosen devices are used), else 2 CPU ranks.
#   MASTER_PORT   rendezvous port, default a free one.
#   DEEPSPEED     launcher command, default `deepspeed`; e.g. "python -m deepspeed.launcher.runner" for a given venv.
#   DS_ARGS       extra launcher flags, word-split, e.g. "--bind_cores_to_rank" (CPU; needs numactl).
#   HF_HUB_OFFLINE, HF_DATASETS_OFFLINE   default 1: nothing is downloaded at run time (local models and data only).
#   DS_ACCELERATOR                        set to cpu when there is no GPU (silences DeepSpeed's detection warning).
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; }
if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    usage
    exit 0
fi
if [[ $# -lt 1 ]]; then
    usage >&2
    exit 2
fi
config=$1
shift

# The repository root on PYTHONPATH: `--module distributed_pt.train` imports without `pip install -e .` (the Triton
# kernels, imported as distributed_pt_kernels on GPU, need the install).
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}

gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi

placement=()
if [[ -n ${NUM_GPUS:-} ]]; then
    placement=(--num_gpus "$NUM_GPUS")
elif ((gpus > 0)) && [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    # DeepSpeed drops CUDA_VISIBLE_DEVICES when --num_gpus is given; --include keeps the chosen devices.
    placement=(--include "localhost:$CUDA_VISIBLE_DEVICES")
elif ((gpus > 0)); then
    placement=(--num_gpus "$gpus")
else
    placement=(--num_gpus 2)
fi
if ((gpus == 0)); then
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi

port=${MASTER_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}

read -r -a deepspeed <<<"${DEEPSPEED:-deepspeed}"
read -r -a ds_args <<<"${DS_ARGS:-}"
# shellcheck source=launch/job.sh
source "$repo_root/launch/job.sh"
run_job "${deepspeed[@]}" "${placement[@]}" --master_port "$port" "${ds_args[@]}" \
    --module distributed_pt.train "$config" "$@"
