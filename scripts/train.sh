#!/usr/bin/env bash
# Launch an mtrain training stage under torchrun: on one node, or as one node of many.
#
#   scripts/train.sh [--dry-run] STAGE [hydra overrides...]     STAGE: pt, sft, dpo or rm
#   scripts/train.sh --print-nproc     print the NPROC_PER_NODE this node would use, and exit
#
# One node, every visible NPU or GPU:
#   scripts/train.sh sft +model=qwen3_8b model.hf_dir=/models/Qwen3-8B load=/ckpt/q8 \
#       save=/ckpt/q8_sft data.path=/data/chat.jsonl
# Two nodes: the same command on each, NODE_RANK=0 on the node MASTER_ADDR names:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 scripts/train.sh pt +model=qwen3_32b ...
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 scripts/train.sh pt +model=qwen3_32b ...
# CPU:  NPROC_PER_NODE=4 scripts/train.sh pt ... device=cpu
# Slurm: scripts/slurm/train.sbatch sets the variables below from the allocation.
#
# Environment [default]:
#   NNODES [1], NODE_RANK [0], MASTER_ADDR [127.0.0.1; required when NNODES > 1],
#   MASTER_PORT [29500]: torchrun's static rendezvous, which is what Ascend clusters use.
#   NPROC_PER_NODE [every visible device: ASCEND_RT_VISIBLE_DEVICES, CUDA_VISIBLE_DEVICES, else
#     what torch_npu or torch counts; 1 when there is no accelerator]
#   PYTHON [python]; DRY_RUN=1 does what --dry-run does: print the torchrun command, run nothing.
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT [300]: seconds torchrun lets its workers finish after a SIGTERM
#     (mtrain saves a checkpoint first) before it kills them; older torchrun (2.7) ignores it
#     and waits 30 s.
# NPU runtime settings (TASK_QUEUE_ENABLE, ...) are applied by mtrain itself; everything else in
# the environment (HCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME, ...) reaches the workers unchanged.
# Exit code: torchrun's (0 when every worker succeeds), or 2 with one "error: ..." line when a
# worker refuses its config or input (mtrain's user errors, see below).
set -euo pipefail

PYTHON=${PYTHON:-python}
USAGE="usage: scripts/train.sh [--dry-run] pt|sft|dpo|rm [hydra overrides...], or --print-nproc"

die() {
    echo "train.sh: $*" >&2
    exit 2
}

# How many entries a comma-separated device list has ("0,1,2,3" -> 4).
count_list() {
    local IFS=,
    local -a items
    read -ra items <<<"$1"
    echo "${#items[@]}"
}

# NPROC_PER_NODE, else one process per device visible to this node's processes.
nproc_per_node() {
    if [[ -n "${NPROC_PER_NODE:-}" ]]; then
        echo "$NPROC_PER_NODE"
    elif [[ -n "${ASCEND_RT_VISIBLE_DEVICES:-}" ]]; then
        count_list "$ASCEND_RT_VISIBLE_DEVICES"
    elif [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
        count_list "$CUDA_VISIBLE_DEVICES"
    else
        # One interpreter start: NPUs when torch_npu imports, else CUDA devices (0 without).
        local probe n
        probe=$'import torch\ntry:\n    import torch_npu\n    n = torch.npu.device_count()\nexcept ImportError:\n    n = 0\nprint(n or torch.cuda.device_count())'
        n=$("$PYTHON" -c "$probe" 2>/dev/null) || n=0
        if [[ "$n" =~ ^[1-9][0-9]*$ ]]; then
            echo "$n"
        else
            echo "train.sh: note: $PYTHON's torch sees no NPU or GPU: 1 process per node" \
                "(set NPROC_PER_NODE for CPU runs)" >&2
            echo 1
        fi
    fi
}

dry_run=${DRY_RUN:-0}
case "${1:-}" in
    --print-nproc) nproc_per_node; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) echo "$USAGE"; exit 0 ;;
esac
stage=${1:-}
[[ "$stage" =~ ^(pt|sft|dpo|rm)$ ]] || die "stage must be pt, sft, dpo or rm, not '$stage'; $USAGE"
shift

nnodes=${NNODES:-1}
node_rank=${NODE_RANK:-0}
master_addr=${MASTER_ADDR:-127.0.0.1}
master_port=${MASTER_PORT:-29500}
nproc=$(nproc_per_node)
for pair in "NNODES=$nnodes" "NODE_RANK=$node_rank" "MASTER_PORT=$master_port" \
    "NPROC_PER_NODE=$nproc"; do
    [[ "${pair#*=}" =~ ^(0|[1-9][0-9]*)$ ]] || die "$pair is not a number"
done
((nnodes >= 1 && nproc >= 1)) || die "NNODES=$nnodes and NPROC_PER_NODE=$nproc must be at least 1"
((node_rank < nnodes)) || die "NODE_RANK=$node_rank must be below NNODES=$nnodes"
# Every node must reach node 0's rendezvous: a default of 127.0.0.1 would leave the others hanging.
if ((nnodes > 1)) && [[ -z "${MASTER_ADDR:-}" ]]; then
    die "NNODES=$nnodes needs MASTER_ADDR, the address of the node with NODE_RANK=0"
fi

# The checkout this script belongs to runs, whatever the working directory (relative paths in the
# overrides keep meaning the caller's directory).
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}

args=(--nnodes "$nnodes" --node_rank "$node_rank" --nproc_per_node "$nproc"
    --master_addr "$master_addr" --master_port "$master_port" -m "mtrain.$stage" "$@")
echo "train.sh: mtrain.$stage: nnodes=$nnodes node_rank=$node_rank nproc_per_node=$nproc" \
    "master=$master_addr:$master_port" >&2
if [[ "$dry_run" == 1 ]]; then
    printf '%q -m torch.distributed.run' "$PYTHON"
    printf ' %q' "${args[@]}"
    echo
    exit 0
fi

# A user error (a bad key, a missing file) is one "error: ..." line from every worker, then the
# others' reactions and torchrun's report. The first worker to fail writes its line to
# MTRAIN_ERROR_FILE (mtrain/errors.py); from then on stderr is dropped, and the launcher prints
# that line once and exits with code 2. Any other failure keeps its output and torchrun's code.
run_dir=$(mktemp -d "${TMPDIR:-/tmp}/mtrain-launch.XXXXXX")
export MTRAIN_ERROR_FILE="$run_dir/error"

# stdin to stderr (fd 3) until a user error is reported, then the rest is read and dropped. It
# ignores signals (Slurm signals every process of the job), so that workers saving a checkpoint
# after a SIGTERM can still log; the end of their output ends it.
until_user_error() {
    trap '' TERM INT HUP QUIT
    local line
    while IFS= read -r line || [[ -n "$line" ]]; do
        [[ -e "$MTRAIN_ERROR_FILE" ]] && break
        printf '%s\n' "$line" >&3 || break
    done
    cat >/dev/null
    rm -rf "$run_dir"
}

# torchrun in this very process, turning a worker's user error into its line and exit code 2
# (mtrain/launch.py).
exec 3>&2
exec "$PYTHON" -m mtrain.launch "${args[@]}" 2> >(until_user_error)
