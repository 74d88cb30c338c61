#!/usr/bin/env bash
# mtrain quickstart: CPU only, nothing downloaded, a few minutes on 2 cores.
#
#   1. build a tiny random Qwen3 model, a tokenizer (HF format) and a small text corpus
#   2. convert it to Megatron shards at TP=2 x PP=2
#   3. run it in megatron-core on 4 CPU processes and compare its logits with transformers'
#   4. convert it back to HF and check every tensor is bit-identical to step 1
#   5. pretrain it for a few steps at TP=2 x PP=2 on the corpus, saving a checkpoint
#   6. fine-tune (SFT) the converted model at TP=2 x PP=2 on a small chat task, export it to HF
#      and ask it in transformers
#   7. LoRA SFT at TP=2 x PP=2 (adapters only in the checkpoint), export it merged and as a PEFT
#      adapter, and check both reproduce the trained model's logits
#
# Usage: bash scripts/quickstart.sh [OUT_DIR]     (default: quickstart_out)
set -euo pipefail

OUT=${1:-quickstart_out}
PY=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
step() { printf '\n== %s\n' "$*"; }

step "1/7 tiny Qwen3 + tokenizer -> $OUT/hf, sample corpus -> $OUT/corpus.jsonl"
$PY -m mtrain.models.tiny out_dir="$OUT/hf" force=true corpus_file="$OUT/corpus.jsonl" \
    chat_file="$OUT/chat.jsonl"

step "2/7 HF -> Megatron TP=2 PP=2 -> $OUT/mcore_tp2pp2"
$PY -m converters.hf2mcore hf_dir="$OUT/hf" out_dir="$OUT/mcore_tp2pp2" tp=2 pp=2 force=true

step "3/7 logits in megatron-core (4 CPU processes) vs transformers"
$PY -m torch.distributed.run --nproc_per_node 4 --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29517}" \
    -m mtrain.verify hf_dir="$OUT/hf" ckpt_dir="$OUT/mcore_tp2pp2" device=cpu \
    result_file="$OUT/parity.json" 2> >(grep -v -E "^W[0-9]{4}|^\*{10,}|OMP_NUM_THREADS|Setting OMP" >&2)

step "4/7 Megatron -> HF -> $OUT/hf_back, compared with step 1"
$PY -m converters.mcore2hf ckpt_dir="$OUT/mcore_tp2pp2" out_dir="$OUT/hf_back" hf_dir="$OUT/hf" force=true
$PY -m converters.compare a="$OUT/hf" b="$OUT/hf_back"

step "5/7 pretraining 20 steps at TP=2 PP=2 (4 CPU processes) -> $OUT/pt"
rm -rf "$OUT/pt"
$PY -m torch.distributed.run --nproc_per_node 4 --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29517}" \
    -m mtrain.pt +model=qwen3_tiny model.hf_dir="$OUT/hf" load="$OUT/mcore_tp2pp2" save="$OUT/pt" \
    data.path="$OUT/corpus.jsonl" data.cache_dir="$OUT/cache" device=cpu \
    parallel.tp=2 parallel.pp=2 train.iters=20 train.seq_length=128 train.global_batch_size=8 \
    train.micro_batch_size=2 train.lr=1e-3 train.warmup_iters=2 log.interval=5 \
    log.metrics_file="$OUT/pt_metrics.jsonl" 2> >(grep -v -E "^W[0-9]{4}|^\*{10,}|OMP_NUM_THREADS|Setting OMP" >&2)

step "6/7 SFT 150 steps at TP=2 PP=2 on $OUT/chat.jsonl -> $OUT/sft -> $OUT/hf_sft"
rm -rf "$OUT/sft"
$PY -m torch.distributed.run --nproc_per_node 4 --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29517}" \
    -m mtrain.sft +model=qwen3_tiny model.hf_dir="$OUT/hf" load="$OUT/mcore_tp2pp2" save="$OUT/sft" \
    data.path="$OUT/chat.jsonl" data.cache_dir="$OUT/cache" data.packing=true device=cpu \
    parallel.tp=2 parallel.pp=2 train.iters=150 train.seq_length=64 train.global_batch_size=16 \
    train.micro_batch_size=4 train.lr=3e-3 train.min_lr=3e-4 train.warmup_iters=10 log.interval=50 \
    2> >(grep -v -E "^W[0-9]{4}|^\*{10,}|OMP_NUM_THREADS|Setting OMP" >&2)
$PY -m converters.mcore2hf ckpt_dir="$OUT/sft" out_dir="$OUT/hf_sft" hf_dir="$OUT/hf" force=true
$PY - "$OUT/hf_sft" <<'PYEOF'
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging
logging.disable_progress_bar()
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
for s in ("ab", "cd", "db"):
    ids = tok.apply_chat_template([{"role": "user", "content": f"reverse: {s}"}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    out = model.generate(ids, max_new_tokens=6, do_sample=False,
                         eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    print(f"  user: reverse: {s}  ->  model: {tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)}")
PYEOF

step "7/7 LoRA SFT 40 steps at TP=2 PP=2 -> $OUT/lora -> merged $OUT/hf_lora, PEFT $OUT/peft_lora"
rm -rf "$OUT/lora"
$PY -m torch.distributed.run --nproc_per_node 4 --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29517}" \
    -m mtrain.sft +model=qwen3_tiny model.hf_dir="$OUT/hf" load="$OUT/mcore_tp2pp2" save="$OUT/lora" \
    finetuning_type=lora lora.r=8 lora.alpha=16 \
    data.path="$OUT/chat.jsonl" data.cache_dir="$OUT/cache" data.packing=true device=cpu \
    parallel.tp=2 parallel.pp=2 train.iters=40 train.seq_length=64 train.global_batch_size=16 \
    train.micro_batch_size=4 train.lr=1e-2 train.warmup_iters=4 log.interval=20 \
    2> >(grep -v -E "^W[0-9]{4}|^\*{10,}|OMP_NUM_THREADS|Setting OMP" >&2)
$PY -m converters.mcore2hf ckpt_dir="$OUT/lora" out_dir="$OUT/hf_lora" hf_dir="$OUT/hf" force=true
$PY -m converters.mcore2hf ckpt_dir="$OUT/lora" out_dir="$OUT/peft_lora" hf_dir="$OUT/hf" lora.merge=false force=true
for check in merged peft; do
    if [ $check = merged ]; then ref=(hf_dir="$OUT/hf_lora"); else ref=(hf_dir="$OUT/hf" peft_dir="$OUT/peft_lora"); fi
    $PY -m torch.distributed.run --nproc_per_node 4 --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29517}" \
        -m mtrain.verify "${ref[@]}" ckpt_dir="$OUT/lora" device=cpu result_file="$OUT/lora_$check.json" \
        2> >(grep -v -E "^W[0-9]{4}|^\*{10,}|OMP_NUM_THREADS|Setting OMP" >&2)
done

printf '\nquickstart done: parity %s\n  HF model     %s/hf\n  Megatron     %s/mcore_tp2pp2\n  round trip   %s/hf_back\n  pretrained   %s/pt (loss %s -> %s)\n  fine-tuned   %s/hf_sft (HF format)\n  LoRA         %s/lora (%s of adapters) -> merged %s/hf_lora %s, PEFT %s/peft_lora %s\n' \
    "$(cat "$OUT/parity.json")" "$OUT" "$OUT" "$OUT" "$OUT" \
    "$($PY -c "import json,sys; print(round(json.loads(open(sys.argv[1]).readline())['loss'], 3))" "$OUT/pt_metrics.jsonl")" \
    "$($PY -c "import json,sys; print(round(json.loads(open(sys.argv[1]).readlines()[-1])['loss'], 3))" "$OUT/pt_metrics.jsonl")" \
    "$OUT" "$OUT" "$(du -sh "$OUT/lora" | cut -f1)" "$OUT" "$(cat "$OUT/lora_merged.json")" "$OUT" "$(cat "$OUT/lora_peft.json")"
