#!/usr/bin/env bash
# Train on several machines listed in a hostfile.
#
#   HOSTFILE=launch/hostfile launch/multi_node.sh CONFIG [key.sub=value ...]            # ssh mode: run once, on node 0
#   NODE_RANK=k HOSTFILE=launch/hostfile launch/multi_node.sh CONFIG [key.sub=value ...] # no-ssh mode: run on every node
#
# ssh mode (NODE_RANK unset): run on the first host of the hostfile. DeepSpeed's launcher reaches every host over
#   ssh (through pdsh by default: install it, or set DS_ARGS="--launcher openmpi" for mpirun) and starts `slots` ranks
#   on each. Needs:
#   - passwordless ssh from this node to every host (`ssh HOST hostname` must work without a prompt);
#   - this repository and the venv at the same absolute path on every node: remote nodes run `cd $PWD` and this
#     node's `sys.executable`;
#   - only variables named PYTHON*, NCCL*, UCX*, MV2*, MLFLOW* are forwarded to the other nodes. Put anything else
#     (HF_HOME, WANDB_API_KEY, CUDA_HOME, ...) in `.deepspeed_env` in the working directory or in $HOME: one KEY=VALUE
#     per line, no comments or blank lines (DeepSpeed splits every line on '=').
# no-ssh mode (NODE_RANK=k): for clusters without ssh between nodes (Kubernetes, some schedulers). Run this script on
#   every node at about the same time, with NODE_RANK=0 on the host at MASTER_ADDR and 1..N-1 on the others in hostfile
#   order; each starts its own ranks (`deepspeed --no_ssh --node_rank k`). The same hostfile and MASTER_ADDR/PORT on
#   every node; environment variables are each node's own (.deepspeed_env is not read).
#
# Both modes: output_dir must be on a filesystem every node shares (NFS, Lustre, ...): ZeRO checkpoints are written
# by every rank into the same checkpoints/ directory and `checkpoint.resume=auto` reads them back on every rank.
#
# Environment:
#   HOSTFILE      hostfile, default launch/hostfile (see launch/hostfile.example: `HOST slots=N`, one node a line).
#   MASTER_ADDR   address of the node with NODE_RANK=0 that every node can reach; default: the first hostfile host.
#   MASTER_PORT   rendezvous port, default 29500; free on the master node and open between nodes.
#   NODE_RANK     this node's index in the hostfile; set it to use no-ssh mode.
#   DEEPSPEED     launcher command, default `deepspeed`; e.g. "python -m deepspeed.launcher.runner".
#   DS_ARGS       extra launcher flags, word-split, e.g. "--launcher openmpi" or "--exclude host2:0".
#   NCCL hints (GPU):  NCCL_SOCKET_IFNAME=eth0 (or ^lo,docker) picks the interface NCCL binds when a node has several;
#                      NCCL_IB_DISABLE=1 falls back to TCP sockets where InfiniBand is absent or misconfigured;
#                      NCCL_DEBUG=INFO shows which transport was chosen. Forwarded to every node in ssh mode.
#   HF_HUB_OFFLINE, HF_DATASETS_OFFLINE   default 1 (the model and data must be local on every node).
# SIGTERM or Ctrl-C: every rank saves a checkpoint and exits (a signal to one node's script stops the whole job); the
# script returns 143 once its node's ranks are gone (launch/job.sh). Exit statuses as in launch/single_node.sh.
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

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
hostfile=${HOSTFILE:-$repo_root/launch/hostfile}
if [[ ! -f $hostfile ]]; then
    echo "error: hostfile not found: $hostfile (set HOSTFILE; see launch/hostfile.example)" >&2
    exit 2
fi
# First host: the first line that is neither blank nor a comment.
first_host=$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$hostfile")
if [[ -z $first_host ]]; then
    echo "error: no hosts in $hostfile" >&2
    exit 2
fi

export PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; }; then
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi

read -r -a deepspeed <<<"${DEEPSPEED:-deepspeed}"
read -r -a ds_args <<<"${DS_ARGS:-}"
mode=()
if [[ -n ${NODE_RANK:-} ]]; then
    mode=(--no_ssh --node_rank "$NODE_RANK")
fi
# shellcheck source=launch/job.sh
source "$repo_root/launch/job.sh"
run_job "${deepspeed[@]}" --hostfile "$hostfile" "${mode[@]}" \
    --master_addr "${MASTER_ADDR:-$first_host}" --master_port "${MASTER_PORT:-29500}" "${ds_args[@]}" \
    --module distributed_pt.train "$config" "$@"
