#!/usr/bin/env bash
# mtrain quickstart: HF checkpoint -> Megatron -> SFT -> DPO -> HF, on CPU, nothing downloaded,
# a few minutes on 2 cores.
#
#   1. build a tiny random Qwen3 model + tokenizer (HF format) and the bundled sample data
#      (a text corpus, a chat task: "reverse: ab" -> "ba", and preference pairs for it)
#   2. convert it to Megatron shards at TP=2 x PP=2
#   3. run the shards in megatron-core on 4 CPU processes and compare logits with transformers'
#   4. convert back to HF and check every tensor is bit-identical to step 1
#   5. pretrain 20 steps at TP=2 x PP=2 on the corpus
#   6. SFT (full, packed) at TP=2 x PP=2 on the chat task; export to HF; ask it in transformers
#   7. DPO with LoRA adapters on the SFT model at TP=2 x PP=2 (plus an SFT term on the chosen
#      answers, dpo.sft_weight=1, so they stay likely); export merged to HF and as a PEFT
#      adapter, check both reproduce the trained model's logits, ask the merged model
#
# Usage: bash scripts/quickstart.sh [OUT_DIR]     (default: quickstart_out)
set -euo pipefail

OUT=${1:-quickstart_out}
PY=${PYTHON:-python}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
export NPROC_PER_NODE=4 MASTER_PORT=${MASTER_PORT:-29517} PYTHON="$PY"
step() { printf '\n== %s\n' "$*"; }
quiet() { grep -v -E "^W[0-9]{4}|^\*{10,}|OMP_NUM_THREADS|Setting OMP|^train.sh: " >&2; }
train() { bash "$ROOT/scripts/train.sh" "$@" 2> >(quiet); }
torchrun4() {
    $PY -m torch.distributed.run --nproc_per_node 4 --master_addr 127.0.0.1 \
        --master_port "$MASTER_PORT" "$@" 2> >(quiet)
}
# first -> last value of a metric in a metrics file
curve() {
    $PY -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]; k=sys.argv[2];
print(f'{r[0][k]:.3f} -> {r[-1][k]:.3f}')" "$1" "$2"
}
# greedy answers of an HF model to a few chat prompts
ask() {
    $PY - "$1" <<'PYEOF'
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
}
COMMON=(+model=qwen3_tiny model.hf_dir="$OUT/hf" data.cache_dir="$OUT/cache" device=cpu
    parallel.tp=2 parallel.pp=2 train.precision=fp32)

step "1/7 tiny Qwen3 + tokenizer -> $OUT/hf; sample data -> $OUT/{corpus,chat,pairs}.jsonl"
$PY -m mtrain.models.tiny out_dir="$OUT/hf" force=true corpus_file="$OUT/corpus.jsonl" \
    chat_file="$OUT/chat.jsonl" pairs_file="$OUT/pairs.jsonl"

step "2/7 HF -> Megatron TP=2 PP=2 -> $OUT/mcore_tp2pp2"
$PY -m converters.hf2mcore hf_dir="$OUT/hf" out_dir="$OUT/mcore_tp2pp2" tp=2 pp=2 force=true

step "3/7 logits in megatron-core (4 CPU processes) vs transformers"
torchrun4 -m mtrain.verify hf_dir="$OUT/hf" ckpt_dir="$OUT/mcore_tp2pp2" device=cpu \
    result_file="$OUT/parity.json"

step "4/7 Megatron -> HF -> $OUT/hf_back, compared with step 1"
$PY -m converters.mcore2hf ckpt_dir="$OUT/mcore_tp2pp2" out_dir="$OUT/hf_back" hf_dir="$OUT/hf" force=true
$PY -m converters.compare a="$OUT/hf" b="$OUT/hf_back"

step "5/7 pretraining 20 steps at TP=2 PP=2 (scripts/train.sh, 4 CPU processes) -> $OUT/pt"
rm -rf "$OUT/pt"
train pt "${COMMON[@]}" load="$OUT/mcore_tp2pp2" save="$OUT/pt" data.path="$OUT/corpus.jsonl" \
    train.iters=20 train.seq_length=128 train.global_batch_size=8 train.micro_batch_size=2 \
    train.lr=1e-3 train.warmup_iters=2 log.interval=5 log.metrics_file="$OUT/pt_metrics.jsonl"

step "6/7 SFT 150 steps at TP=2 PP=2 on $OUT/chat.jsonl -> $OUT/sft -> HF $OUT/hf_sft"
rm -rf "$OUT/sft" "$OUT/sft_metrics.jsonl"
train sft "${COMMON[@]}" load="$OUT/mcore_tp2pp2" save="$OUT/sft" data.path="$OUT/chat.jsonl" \
    data.packing=true train.iters=150 train.seq_length=64 train.global_batch_size=16 \
    train.micro_batch_size=4 train.lr=3e-3 train.min_lr=3e-4 train.warmup_iters=10 \
    log.interval=50 log.metrics_file="$OUT/sft_metrics.jsonl"
$PY -m converters.mcore2hf ckpt_dir="$OUT/sft" out_dir="$OUT/hf_sft" hf_dir="$OUT/hf" force=true
ask "$OUT/hf_sft"

step "7/7 DPO + LoRA 30 steps at TP=2 PP=2 on $OUT/pairs.jsonl from $OUT/sft -> $OUT/dpo -> merged HF $OUT/hf_dpo"
rm -rf "$OUT/dpo" "$OUT/dpo_metrics.jsonl"
train dpo "${COMMON[@]}" load="$OUT/sft" save="$OUT/dpo" data.path="$OUT/pairs.jsonl" \
    finetuning_type=lora lora.r=8 lora.alpha=16 dpo.beta=0.1 dpo.sft_weight=1.0 train.iters=30 \
    train.seq_length=32 train.global_batch_size=8 train.micro_batch_size=2 train.lr=2e-3 \
    train.warmup_iters=3 log.interval=10 log.metrics_file="$OUT/dpo_metrics.jsonl"
$PY -m converters.mcore2hf ckpt_dir="$OUT/dpo" out_dir="$OUT/hf_dpo" hf_dir="$OUT/hf" force=true
$PY -m converters.mcore2hf ckpt_dir="$OUT/dpo" out_dir="$OUT/peft_dpo" hf_dir="$OUT/hf" \
    lora.merge=false force=true
torchrun4 -m mtrain.verify hf_dir="$OUT/hf_dpo" ckpt_dir="$OUT/dpo" device=cpu \
    result_file="$OUT/dpo_merged.json"
torchrun4 -m mtrain.verify hf_dir="$OUT/hf_sft" peft_dir="$OUT/peft_dpo" ckpt_dir="$OUT/dpo" \
    device=cpu result_file="$OUT/dpo_peft.json"
ask "$OUT/hf_dpo"

cat <<DONE

quickstart done
  HF model      $OUT/hf
  Megatron      $OUT/mcore_tp2pp2   logits vs HF: $(cat "$OUT/parity.json")
  round trip    $OUT/hf_back        (bit-identical to $OUT/hf)
  pretrained    $OUT/pt             loss $(curve "$OUT/pt_metrics.jsonl" loss)
  SFT           $OUT/sft -> HF $OUT/hf_sft   loss $(curve "$OUT/sft_metrics.jsonl" loss)
  DPO (LoRA)    $OUT/dpo ($(du -sh "$OUT/dpo" | cut -f1) of adapters)   loss $(curve "$OUT/dpo_metrics.jsonl" loss), margin $(curve "$OUT/dpo_metrics.jsonl" rewards/margin)
                merged HF $OUT/hf_dpo $(cat "$OUT/dpo_merged.json")
                PEFT adapter $OUT/peft_dpo on $OUT/hf_sft $(cat "$OUT/dpo_peft.json")
DONE
