#!/usr/bin/env bash
# The measurements of docs/BENCHMARKS.md and the README's results, on a lent GPU machine that has torch,
# transformers and peft but not the rest (../shared/device/README.md). Before it, the GGUF of the embedded model
# is staged in parts under /tmp/stage (../shared/device/stage_model.sh) and the wheels travel as .whl/.
#   bash bench/gpu_session.sh setup reproduce       # the seed study on GPU 0 -> $OUT/outputs/reproduce
#   bash bench/gpu_session.sh setup bench_train      # training speed: seed-style vs adl-llm (about 5 minutes)
#   bash bench/gpu_session.sh bench_infer ddp        # perplexity and generation; training on 1 vs 2 GPUs
#   bash bench/gpu_session.sh bench7b                # speed and memory on a random-weight Llama-2-7B shape
#   bash bench/gpu_session.sh bench7b_train          # its training only, with and without checkpointing
#   bash bench/gpu_session.sh profile                # where a training pass spends its time (bench/profile_train.py)
# Everything it writes goes under $OUT (default outputs/gpu), which is what comes back from the machine.
set -euo pipefail
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
export PYTHONPATH=/tmp/site:. ADL_LLM_CACHE=/tmp/adl_cache PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # the machine's rule
PY=python3

log() { tr '\r' '\n' | grep --line-buffered -v "%|" > "$OUT/$1.log" || true; }  # progress bars dropped

setup() {
  test -d /tmp/site || $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  local model=$ADL_LLM_CACHE/models/gemma3-270m
  if [ ! -f "$model/adl_llm_embedded.json" ]; then
    cat /tmp/stage/p? > /tmp/gemma.gguf
    $PY -m bench.build_gemma /tmp/gemma.gguf
  fi
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/cards.txt"
  $PY -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)" | tee "$OUT/versions.txt"
}

reproduce() {  # the chain, the curve, the comparison and the beam sweep, on one card
  rm -rf outputs/reproduce && mkdir -p "$OUT/reproduce" && ln -sfn "$(realpath "$OUT/reproduce")" outputs/reproduce
  CUDA_VISIBLE_DEVICES=0 $PY -m adl_llm.reproduce train.save_every=0 2>&1 | log reproduce
  find "$OUT/reproduce" -type d -name checkpoints -prune -exec rm -rf {} +  # megabytes that need not come back
  tail -n 60 "$OUT/reproduce.log"
}

embedded() { CUDA_VISIBLE_DEVICES=0 $PY -m bench.run --model embedded --model-path "$ADL_LLM_CACHE/models/gemma3-270m" \
  --out "$OUT/bench" "$@"; }

bench_train() {  # the embedded model: the seed-style Trainer against adl-llm and its ablations, on GPU 0
  embedded --only train --train-steps 50 --ablation-steps 20 2>&1 | log bench-embedded-train
  tail -n 50 "$OUT/bench-embedded-train.log"
}

bench_infer() {  # the embedded model: the course ppl loop and the one-prompt generate loop against adl-llm
  embedded --only ppl,gen --precision-check --n-gen 250 --n-gen-baseline 16 2>&1 | log bench-embedded-infer
  tail -n 50 "$OUT/bench-embedded-infer.log"
}

profile() {  # where a training pass of the embedded model spends its time
  CUDA_VISIBLE_DEVICES=0 $PY -m bench.profile_train --model-path "$ADL_LLM_CACHE/models/gemma3-270m" --out "$OUT/profile" \
    2>&1 | log profile
  head -n 45 "$OUT/profile/profile.txt"
}

beams() {  # the beam sweep of ADAPTER (default: the base model) with the report's sampling
  CUDA_VISIBLE_DEVICES=0 $PY -m adl_llm.run -m task=generate gen.beams=1,3,5 adapter="${ADAPTER:-null}" \
    hydra.sweep.dir="$OUT/beams" 2>&1 | log beams
  cat "$OUT/beams/summary.md"
}

ddp() {  # training tokens/s on 1 and 2 GPUs over the first 200 steps of the 3000 records, the same global batch
  local args=(task=train train.max_steps=200 data.n_eval=16 train.save_every=0)
  CUDA_VISIBLE_DEVICES=0 $PY -m adl_llm.run "${args[@]}" hydra.run.dir="$OUT/ddp/1gpu" > "$OUT/ddp-1gpu.log" 2>&1 || true
  $PY -m torch.distributed.run --standalone --nproc_per_node=2 -m adl_llm.run "${args[@]}" \
    hydra.run.dir="$OUT/ddp/2gpu" > "$OUT/ddp-2gpu.log" 2>&1 || true
  rm -rf "$OUT"/ddp/*/adapter "$OUT"/ddp/*/checkpoints
  grep -h '"train/tokens_per_s"\|"train/seconds_per_epoch"\|"mean_perplexity"' "$OUT"/ddp/*/metrics.json || tail "$OUT"/ddp-*.log
}

bench7b_train() {  # the 7B's training only, with and without the automatic gradient checkpointing
  test -d /tmp/llama7b || $PY -m bench.build_llama7b /tmp/llama7b
  CUDA_VISIBLE_DEVICES=0 $PY -m bench.run --model llama7b --model-path /tmp/llama7b --only train --train-steps 10 \
    --ablation-steps 10 --ablations no_checkpointing --out "$OUT/bench" 2>&1 | log bench-llama7b-train
  tail -n 40 "$OUT/bench-llama7b-train.log"
}

bench7b() {  # a random-weight Llama-2-7B shape: speed and memory only
  test -d /tmp/llama7b || $PY -m bench.build_llama7b /tmp/llama7b
  CUDA_VISIBLE_DEVICES=0 $PY -m bench.run --model llama7b --model-path /tmp/llama7b --train-steps 10 --ablation-steps 0 \
    --n-eval 100 --n-gen 24 --n-gen-baseline 4 --out "$OUT/bench" 2>&1 | log bench-llama7b
  tail -n 50 "$OUT/bench-llama7b.log"
}

for part in "$@"; do
  echo "== $part $(date +%T)"
  "$part"
done
echo "== done $(date +%T)"
