#!/usr/bin/env bash
# mtrain quickstart: CPU only, nothing downloaded, a few minutes on 2 cores.
#
#   1. build a tiny random Qwen3 model and a tokenizer (HF format)
#   2. convert it to Megatron shards at TP=2 x PP=2
#   3. run it in megatron-core on 4 CPU processes and compare its logits with transformers'
#   4. convert it back to HF and check every tensor is bit-identical to step 1
#
# Usage: bash scripts/quickstart.sh [OUT_DIR]     (default: quickstart_out)
set -euo pipefail

OUT=${1:-quickstart_out}
PY=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
step() { printf '\n== %s\n' "$*"; }

step "1/4 tiny Qwen3 + tokenizer -> $OUT/hf"
$PY -m mtrain.models.tiny out_dir="$OUT/hf" force=true

step "2/4 HF -> Megatron TP=2 PP=2 -> $OUT/mcore_tp2pp2"
$PY -m converters.hf2mcore hf_dir="$OUT/hf" out_dir="$OUT/mcore_tp2pp2" tp=2 pp=2 force=true

step "3/4 logits in megatron-core (4 CPU processes) vs transformers"
$PY -m torch.distributed.run --nproc_per_node 4 --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29517}" \
    -m mtrain.verify hf_dir="$OUT/hf" ckpt_dir="$OUT/mcore_tp2pp2" device=cpu \
    result_file="$OUT/parity.json" 2> >(grep -v -E "^W[0-9]{4}|^\*{10,}|OMP_NUM_THREADS|Setting OMP" >&2)

step "4/4 Megatron -> HF -> $OUT/hf_back, compared with step 1"
$PY -m converters.mcore2hf ckpt_dir="$OUT/mcore_tp2pp2" out_dir="$OUT/hf_back" hf_dir="$OUT/hf" force=true
$PY -m converters.compare a="$OUT/hf" b="$OUT/hf_back"

printf '\nquickstart done: parity %s\n  HF model     %s/hf\n  Megatron     %s/mcore_tp2pp2\n  round trip   %s/hf_back\n' \
    "$(cat "$OUT/parity.json")" "$OUT" "$OUT" "$OUT"
