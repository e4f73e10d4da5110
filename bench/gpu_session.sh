#!/usr/bin/env bash
# The measurements of docs/BENCHMARKS.md and the README's results, on a lent GPU machine that has torch,
# transformers and peft but not the rest (../shared/device/README.md). Before it, the wheels travel as .whl/ and
# are installed to /tmp/site (`install`), and the GGUF of the embedded model is staged in parts under /tmp/stage
# (../shared/device/stage_model.sh). Each part runs on GPU $GPU (default 0) unless it says otherwise, so two parts
# can share a 2-GPU machine: `GPU=0 bash bench/gpu_session.sh bench7b_train & GPU=1 bash ... bench_train & wait`.
#   bash bench/gpu_session.sh install                # the carried wheels (transformers 5.24, bitsandbytes, trl, ...)
#   bash bench/gpu_session.sh setup gpu_tests        # the embedded model from the staged GGUF; tests marked gpu
#   bash bench/gpu_session.sh reproduce              # the seed study (what make reproduce runs)
#   bash bench/gpu_session.sh bench_train            # training speed: adl-llm, TRL (+ Liger), the seed-style loop
#   bash bench/gpu_session.sh bench_infer ddp        # perplexity and generation; training on 1 vs 2 GPUs
#   bash bench/gpu_session.sh bench7b_train          # a random-weight Llama-2-7B shape: training against TRL
#   bash bench/gpu_session.sh bench7b                # the 7B shape: perplexity and generation too
#   bash bench/gpu_session.sh profile                # where a training pass spends its time (bench/profile_train.py)
#   bash bench/gpu_session.sh decode                 # decoding: the fast path against today's, the chain's adapter
#   bash bench/gpu_session.sh decode_sampling        # the same, the report's sampling at beams 1, 3, 5 only
#   bash bench/gpu_session.sh decode_greedy          # greedy only: fast, plain, and plain in batches of 64
#   SEEDS="1 2" bash bench/gpu_session.sh decode_seeds  # decode_sampling once per seed
#   bash bench/gpu_session.sh greedy_fp32            # greedy in float32, fast against plain: the same text?
#   bash bench/gpu_session.sh decode7b               # the same at beams 5 on the 7B shape (NF4 + adapter)
#   bash bench/gpu_session.sh profile_decode7b       # where the 7B shape's decoding step spends its time
#   DECODE=report BEAMS=5 bash bench/gpu_session.sh profile_decode  # where a decoding step spends its time
#   bash bench/gpu_session.sh profile7b              # the 7B shape's training step: eager, compiled, CUDA graphs
#   bash bench/gpu_session.sh chain                  # the 1+1+3 chain alone (make chain)
#   bash bench/gpu_session.sh ddp7b_single           # 2 GPUs: the 7B shape trained on one GPU, batch 16 and 64
#   bash bench/gpu_session.sh ddp7b                  # 2 GPUs: the same on both (torchrun), profiles of both ranks
#   bash bench/gpu_session.sh ddp7b_compile          # 2 GPUs: batch 16 on one and on both with train.compile=true
#                                                    # (ddp7b_compile1: the one-GPU run alone, on $GPU; 2: both)
#   bash bench/gpu_session.sh ddp7b_b64              # 2 GPUs: the same at global batch 64, one GPU then both
#   bash bench/gpu_session.sh sweep_gpus             # 2 GPUs: a 4-job sweep one job after another on one GPU,
#                                                    # then spread over both (hydra/launcher=gpus)
#   bash bench/gpu_session.sh pack NAME              # KEEP's results (no checkpoints) as $OUT/NAME.tgz
#   bash bench/gpu_session.sh poll SECONDS NAME      # wait, show the background chains' ends, then pack NAME
# Results go to KEEP (default /tmp/gpu), which outlives a call while the machine stays warm; `pack` puts them in
# the one file that comes back from the machine. The machine goes back about 30 s after a call ends, even while
# parts run in the background (setsid ... > $KEEP/chainN.out): keep `poll` calls back to back until they are done,
# and pack in each, since whatever is not packed is lost with the machine.
set -euo pipefail
KEEP=${KEEP:-/tmp/gpu}
OUT=${OUT:-outputs/gpu}
mkdir -p "$KEEP" "$OUT"
export PYTHONPATH=/tmp/site:. ADL_LLM_CACHE=/tmp/adl_cache PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # the machine's rule
PY=python3
GPU=${GPU:-0}

log() { tr '\r' '\n' | grep --line-buffered -v "%|" > "$KEEP/$1.log" || true; }  # progress bars dropped

install() {  # the wheels this call carried: .whl/, and .stage/whl2/ where one call's 64 MiB could not hold them all
  # (the tracked tree and every wheel passed it: bitsandbytes' 43 MB wheel goes in a second call)
  local dir
  for dir in .whl .stage/whl2; do
    if compgen -G "$dir/*.whl" > /dev/null; then
      $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$dir"/*.whl
    fi
  done
}

setup() {
  local model=$ADL_LLM_CACHE/models/gemma3-270m
  if [ ! -f "$model/adl_llm_embedded.json" ]; then
    cat /tmp/stage/p? > /tmp/gemma.gguf
    $PY -m bench.build_gemma /tmp/gemma.gguf
  fi
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$KEEP/cards.txt"
  # Every figure names the versions it was made with; the machine's own transformers (5.17) is below the floor that
  # converts the Gemma tokenizer right, so the carried wheel must be the one imported.
  $PY -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)" | tee "$KEEP/versions.txt"
  $PY -c "import transformers; from adl_llm.embedded import TRANSFORMERS_FLOOR as f; from packaging.version import V\
ersion as V; assert V(transformers.__version__) >= V(f), f'transformers {transformers.__version__} < {f}: carry .whl'"
}

gpu_tests() {  # the tests that need a GPU, on the embedded model (TESTS=<pytest -k expression>: some of them)
  CUDA_VISIBLE_DEVICES=$GPU $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py ${TESTS:+-k "$TESTS"} 2>&1 \
    | tee "$KEEP/gpu_tests.log" | tail -n 15 || true  # a failure is in the log; the parts after it still run
}

reproduce() {  # the chain, the curve, the comparison and the beam sweep
  rm -rf outputs/reproduce && mkdir -p "$KEEP/reproduce" && ln -sfn "$KEEP/reproduce" outputs/reproduce
  CUDA_VISIBLE_DEVICES=$GPU $PY -m adl_llm.reproduce train.save_every=0 2>&1 | log reproduce
  tail -n 60 "$KEEP/reproduce.log"
}

chain() {  # the report's 1+1+3 stage chain (what make chain runs)
  CUDA_VISIBLE_DEVICES=$GPU $PY -m adl_llm.run -m experiment=chain train.save_every=0 hydra.sweep.dir="$KEEP/chain" \
    2>&1 | log chain
  cat "$KEEP/chain/summary.md"
}

embedded() { CUDA_VISIBLE_DEVICES=$GPU $PY -m bench.run --model embedded --model-path "$ADL_LLM_CACHE/models/gemma3-270m" \
  --out "$KEEP/bench" "$@"; }

bench_train() {  # the embedded model: adl-llm against TRL (with and without Liger and checkpointing) and the seed
  embedded --only train --train-steps 40 --baseline-steps 12 --ablations ${ABLATIONS:-eager,cudagraphs} 2>&1 | log bench-embedded-train
  tail -n 40 "$KEEP/bench-embedded-train.log"
}

bench_infer() {  # the embedded model: the course ppl loop and the one-prompt generate loop against adl-llm
  embedded --only ppl,gen --precision-check --n-gen 250 --n-gen-baseline 16 2>&1 | log bench-embedded-infer
  tail -n 50 "$KEEP/bench-embedded-infer.log"
}

profile7b() {  # where a training step of the 7B shape spends its time: eager, compiled, compiled in CUDA graphs
  llama7b
  local variant
  for variant in ${VARIANTS:-eager compile reduce-overhead}; do
    local flags=()
    [ "$variant" = compile ] && flags=(--compile)
    [ "$variant" = reduce-overhead ] && flags=(--compile-mode reduce-overhead)
    CUDA_VISIBLE_DEVICES=$GPU $PY -m bench.profile_train --model-path /tmp/llama7b --passes 3 "${flags[@]}" \
      --out "$KEEP/profile7b-$variant" > "$KEEP/profile7b-$variant.log" 2>&1 || tail -n 12 "$KEEP/profile7b-$variant.log"
    head -n 4 "$KEEP/profile7b-$variant/profile.txt" || true
  done
}

profile() {  # where a training pass of the embedded model spends its time
  CUDA_VISIBLE_DEVICES=$GPU $PY -m bench.profile_train --model-path "$ADL_LLM_CACHE/models/gemma3-270m" \
    --out "$KEEP/profile" 2>&1 | log profile
  head -n 45 "$KEEP/profile/profile.txt"
}

beams() {  # the beam sweep of ADAPTER (default: the base model) with the report's sampling
  CUDA_VISIBLE_DEVICES=$GPU $PY -m adl_llm.run -m task=generate gen.beams=1,3,5 adapter="${ADAPTER:-null}" \
    hydra.sweep.dir="$KEEP/beams" 2>&1 | log beams
  cat "$KEEP/beams/summary.md"
}

ddp() {  # training tokens/s on 1 and 2 GPUs over the first 200 steps of the 3000 records, the same global batch
  local args=(task=train train.max_steps=200 data.n_eval=16 train.save_every=0)
  CUDA_VISIBLE_DEVICES=$GPU $PY -m adl_llm.run "${args[@]}" hydra.run.dir="$KEEP/ddp/1gpu" > "$KEEP/ddp-1gpu.log" 2>&1 || true
  $PY -m torch.distributed.run --standalone --nproc_per_node=2 -m adl_llm.run "${args[@]}" \
    hydra.run.dir="$KEEP/ddp/2gpu" > "$KEEP/ddp-2gpu.log" 2>&1 || true
  rm -rf "$KEEP"/ddp/*/adapter "$KEEP"/ddp/*/checkpoints
  grep -h '"train/tokens_per_s"\|"train/seconds_per_epoch"\|"eval/perplexity"' "$KEEP"/ddp/*/metrics.json \
    || tail "$KEEP"/ddp-*.log
}

llama7b() { test -d /tmp/llama7b || $PY -m bench.build_llama7b /tmp/llama7b; }

# The 7B shape, the first 3000 records, global batch 16 (40 steps) and 64 (12 steps); per-step losses in metrics.json.
DDP7B=(task=train model.name_or_path=/tmp/llama7b data.n_eval=16 train.save_every=0)
ddp7b_run() {  # NAME NPROC BATCH STEPS [OVERRIDES...]
  local name=$1 nproc=$2 batch=$3 steps=$4 launch=(-m adl_llm.run)
  shift 4
  if [ "$nproc" -gt 1 ]; then launch=(-m torch.distributed.run --standalone --nproc_per_node="$nproc" "${launch[@]}"); fi
  $PY "${launch[@]}" "${DDP7B[@]}" train.batch_size="$batch" train.max_steps="$steps" "$@" \
    hydra.run.dir="$KEEP/ddp7b/$name" > "$KEEP/ddp7b-$name.log" 2>&1 || tail -n 20 "$KEEP/ddp7b-$name.log"
  rm -rf "$KEEP/ddp7b/$name/adapter" "$KEEP/ddp7b/$name/checkpoints"
}

ddp7b_single() {  # one GPU, batch 16 and 64 at once on GPU 0 and GPU 1 (one run a GPU, so neither shares a card)
  llama7b
  CUDA_VISIBLE_DEVICES=0 ddp7b_run 1gpu-b16 1 16 40 &
  CUDA_VISIBLE_DEVICES=1 ddp7b_run 1gpu-b64 1 64 12 &
  wait
}

ddp7b() {  # both GPUs: the same runs under torchrun (NCCL's transport logged), then a profile of each rank's step
  llama7b
  NCCL_DEBUG=INFO ddp7b_run 2gpu-b16 2 16 40
  grep -h "via\|Channel 00" "$KEEP/ddp7b-2gpu-b16.log" | sort -u | head -n 8 || true
  ddp7b_run 2gpu-b64 2 64 12
  $PY -m torch.distributed.run --standalone --nproc_per_node=2 -m bench.profile_train --model-path /tmp/llama7b \
    --passes 3 --out "$KEEP/profile-ddp7b" > "$KEEP/profile-ddp7b.log" 2>&1 || tail -n 20 "$KEEP/profile-ddp7b.log"
  CUDA_VISIBLE_DEVICES=0 $PY -m bench.profile_train --model-path /tmp/llama7b --passes 3 --out "$KEEP/profile-1gpu7b" \
    > "$KEEP/profile-1gpu7b.log" 2>&1 || tail -n 20 "$KEEP/profile-1gpu7b.log"
  head -n 4 "$KEEP"/profile-ddp7b/*.txt "$KEEP"/profile-1gpu7b/*.txt || true
  $PY -m bench.ddp_table "$KEEP/ddp7b" | tee "$KEEP/ddp7b.md"
}

ddp7b_compile() { ddp7b_compile1 && ddp7b_compile2; }  # batch 16, compiled decoder layers, the default budget
ddp7b_compile1() { llama7b && CUDA_VISIBLE_DEVICES=$GPU ddp7b_run 1gpu-b16-compile 1 16 40 train.compile=true; }
ddp7b_compile2() {  # both GPUs (torchrun), then the table against the one-GPU run
  llama7b
  ddp7b_run 2gpu-b16-compile 2 16 40 train.compile=true
  $PY -m bench.ddp_table "$KEEP/ddp7b" | tee "$KEEP/ddp7b.md"
}
ddp7b_b64() {  # global batch 64 (20 steps), the defaults: one GPU on $GPU, then both; the table of every run so far
  llama7b
  CUDA_VISIBLE_DEVICES=$GPU ddp7b_run 1gpu-b64-compile 1 64 20
  ddp7b_run 2gpu-b64-compile 2 64 20
  $PY -m bench.ddp_table "$KEEP/ddp7b" | tee "$KEEP/ddp7b.md"
}

# A 4-job training sweep of the embedded model (lr x LoRA rank), the same jobs both ways; SWEEP_LENGTH sets how long
# a job trains (the default: two epochs of the 3000 records, about 47 s a job on an H200: the sequential half took
# 198.5 s, so both halves fit in one 10-minute call; each process's first job also pays about 17 s of imports,
# tokenizer and data, which one-epoch jobs of 25 s cannot amortise).
SWEEP=(-m task=train "${SWEEP_LENGTH:-train.epochs=2}" train.save_every=0 optim.lr=3e-5,1e-4 lora.r=16,64)
cold_caches() {  # NAME: torch.compile's on-disk caches (inductor's, Triton's) fresh for one half of a comparison,
  # so the half that runs second does not load what the first compiled
  export TORCHINDUCTOR_CACHE_DIR=$KEEP/caches/$1/inductor TRITON_CACHE_DIR=$KEEP/caches/$1/triton
  rm -rf "$KEEP/caches/$1"
}
sweep_gpus() {
  local started
  cold_caches sweep-one
  started=$(date +%s%N)
  CUDA_VISIBLE_DEVICES=0 $PY -m adl_llm.run "${SWEEP[@]}" hydra.sweep.dir="$KEEP/sweep/one-gpu" > "$KEEP/sweep-one.log" 2>&1 \
    || tail -n 20 "$KEEP/sweep-one.log"  # a failed job is in the summary; the timing still counts
  echo "one GPU, one job after another: $((($(date +%s%N) - started) / 1000000)) ms" | tee "$KEEP/sweep.txt"
  cold_caches sweep-two
  started=$(date +%s%N)
  $PY -m adl_llm.run "${SWEEP[@]}" hydra/launcher=gpus hydra.sweep.dir="$KEEP/sweep/two-gpus" > "$KEEP/sweep-two.log" 2>&1 \
    || tail -n 20 "$KEEP/sweep-two.log"
  echo "two GPUs, hydra/launcher=gpus: $((($(date +%s%N) - started) / 1000000)) ms" | tee -a "$KEEP/sweep.txt"
  grep -h '"cuda_visible_devices"' "$KEEP"/sweep/two-gpus/*/run.json | sort | uniq -c | tee -a "$KEEP/sweep.txt"
  rm -rf "$KEEP"/sweep/*/*/adapter "$KEEP"/sweep/*/*/checkpoints "$KEEP/caches"
  unset TORCHINDUCTOR_CACHE_DIR TRITON_CACHE_DIR
  cat "$KEEP/sweep/one-gpu/summary.md" "$KEEP/sweep/two-gpus/summary.md"
}

# Decoding (issue 19): the chain's adapter (ADAPTER, default the one staged with the model) on the 250 public-test
# prompts, each setting with every piece of the fast path (gen.compile=true) and on the plain path
# (gen.dequantize/static_cache/compile=false), one command a folder with its wall time; with PIECES=1 also the
# default path, and greedy with each piece alone.
PLAIN=(gen.dequantize=false gen.static_cache=false gen.compile=false gen.fused_sampling=false gen.defer_syncs=false)
decode_run() {  # FOLDER ARGS...: one adl_llm.run command, timed
  local name=$1 started
  shift
  mkdir -p "$KEEP/decode/$name"
  started=$(date +%s%N)
  CUDA_VISIBLE_DEVICES=$GPU $PY -m adl_llm.run "$@" hydra.run.dir="$KEEP/decode/$name" hydra.sweep.dir="$KEEP/decode/$name" \
    > "$KEEP/decode-$name.log" 2>&1 || tail -n 20 "$KEEP/decode-$name.log"
  echo $((($(date +%s%N) - started) / 1000000)) > "$KEEP/decode/$name/wall_ms.txt"
}
decode() { decode_sampling && decode_greedy; }
decode_sampling() {  # the report's sampling at beams 1, 3 and 5: the fast path and the plain one
  local a=(task=generate adapter="${ADAPTER:-/tmp/stage/adapter}" ${SEED_ARG:-})
  decode_run sampling-fast -m "${a[@]}" gen.beams=1,3,5 gen.compile=true
  decode_run sampling-plain -m "${a[@]}" gen.beams=1,3,5 "${PLAIN[@]}"
  if [ -n "${PIECES:-}" ]; then  # each piece alone (PIECES=1)
    decode_run sampling-default -m "${a[@]}" gen.beams=1,3,5  # a GPU's default path: the weights dequantised
    decode_run greedy-dequantize "${a[@]}" gen=greedy  # the default path
    decode_run greedy-static "${a[@]}" gen=greedy gen.dequantize=false gen.static_cache=true
    decode_run greedy-static+compile "${a[@]}" gen=greedy gen.dequantize=false gen.compile=true
  fi
  $PY -m bench.decode_table "$KEEP/decode" | tee "$KEEP/decode.md"
}
decode_greedy() {  # greedy alone: the fast path, the plain one, and the plain one in batches of 64
  local a=(task=generate adapter="${ADAPTER:-/tmp/stage/adapter}")
  decode_run greedy-fast "${a[@]}" gen=greedy gen.compile=true
  decode_run greedy-plain "${a[@]}" gen=greedy "${PLAIN[@]}"
  # The plain path against itself in batches of 64 (other widths, other sums): how many of its own greedy answers
  # keep their text, the yardstick for the fast path's "same text as plain"
  decode_run greedy-plain64 "${a[@]}" gen=greedy "${PLAIN[@]}" gen.batch_size=64
  $PY -m bench.decode_table "$KEEP/decode" | tee "$KEEP/decode.md"
}

decode_seeds() {  # decode_sampling once per seed in SEEDS (default 1 2), each in KEEP/seed-N: a sampled batch lasts
  # as long as its longest answer, so one seed's ratio at beams 3 or 5 is one draw of a random variable
  local seed
  for seed in ${SEEDS:-1 2}; do
    mkdir -p "$KEEP/seed-$seed"
    ADAPTER=${ADAPTER:-/tmp/stage/adapter} KEEP=$KEEP/seed-$seed SEED_ARG=seed=$seed decode_sampling
  done
}
greedy_fp32() {  # greedy in float32 on both paths: with rounding out of the way, the same text is the test of the path
  local a=(task=generate adapter="${ADAPTER:-/tmp/stage/adapter}" gen=greedy model.dtype=float32)
  decode_run fp32greedy-fast "${a[@]}" gen.compile=true
  decode_run fp32greedy-plain "${a[@]}" "${PLAIN[@]}"
  $PY -m bench.decode_table "$KEEP/decode" | tee "$KEEP/decode.md"
}

profile_decode() {  # where a decoding step spends its time, on each path (PATHS), decoding DECODE (default greedy;
  # report: the report's sampling) with BEAMS beams; the embedded model with the chain's adapter, or MODEL with ADAPTER
  local name=profile-decode-${DECODE:-greedy}-b${BEAMS:-1}${MODEL:+-$(basename "$MODEL")}
  CUDA_VISIBLE_DEVICES=$GPU $PY -m bench.profile_decode --model-path "${MODEL:-$ADL_LLM_CACHE/models/gemma3-270m}" \
    --adapter "${ADAPTER:-/tmp/stage/adapter}" --gen "${DECODE:-greedy}" --beams "${BEAMS:-1}" --prompts "${PROMPTS:-250}" \
    --paths "${PATHS:-plain,default,compiled}" --new-tokens "${NEW_TOKENS:-32}" ${STOPS:+--stops} ${SOURCES:+--sync-sources} \
    --out "$KEEP/$name" 2>&1 | log "$name"
  grep -h "^==\|a step\|^  " "$KEEP/$name/profile-decode.txt" || tail -n 20 "$KEEP/$name.log"
}

adapter7b() {  # an adapter of one training step on the 7B shape, for its decoding
  llama7b
  test -d "$KEEP/adapter7b/adapter" || CUDA_VISIBLE_DEVICES=$GPU $PY -m adl_llm.run "${DDP7B[@]}" train.max_steps=1 \
    data.n_train=16 data.n_eval=4 hydra.run.dir="$KEEP/adapter7b" > "$KEEP/adapter7b.log" 2>&1 || tail -n 20 "$KEEP/adapter7b.log"
}

decode7b() {  # the 7B shape in NF4 with an adapter (one training step's), beams 5 with the report's sampling
  adapter7b
  local a=(task=generate model.name_or_path=/tmp/llama7b adapter="$KEEP/adapter7b/adapter" data.n_eval="${N7B:-50}" gen.beams=5)
  KEEP=$KEEP/d7 decode_run beams5-fast "${a[@]}" gen.compile=true
  if [ -z "${NO_BNB7B:-}" ]; then  # bitsandbytes' operator in the compiled step (NO_BNB7B=1: skipped)
    KEEP=$KEEP/d7 decode_run beams5-fast-bnb "${a[@]}" gen.compile=true gen.nf4_graph=false
  fi
  KEEP=$KEEP/d7 decode_run beams5-plain "${a[@]}" "${PLAIN[@]}"
  $PY -m bench.decode_table "$KEEP/d7/decode" | tee "$KEEP/decode7b.md"
}

profile_decode7b() {  # the 7B shape's decoding step at beams 5 with the report's sampling, plain and compiled
  adapter7b
  MODEL=/tmp/llama7b ADAPTER=$KEEP/adapter7b/adapter DECODE=report BEAMS=5 PROMPTS=${PROMPTS:-2} SOURCES=1 \
    PATHS=${PATHS:-plain,compiled,compiled_undeferred} profile_decode
}

bench7b_train() {  # the 7B shape's training: adl-llm (default, 40 GiB, no Liger) against TRL + Liger, no seed-style loop
  llama7b
  CUDA_VISIBLE_DEVICES=$GPU $PY -m bench.run --model llama7b --model-path /tmp/llama7b --only train \
    --train-steps "${STEPS7B:-16}" --warmup-steps "${WARMUP7B:-6}" --baseline-steps 0 --ablations "${ABLATIONS7B:-budget40,eager,eager_budget40,cudagraphs_budget40}" --peers "${PEERS7B:-trl_liger,trl_liger_checkpointing}" \
    --out "$KEEP/bench" 2>&1 \
    | log bench-llama7b-train
  tail -n 30 "$KEEP/bench-llama7b-train.log"
}

bench7b() {  # a random-weight Llama-2-7B shape: speed and memory only
  llama7b
  CUDA_VISIBLE_DEVICES=$GPU $PY -m bench.run --model llama7b --model-path /tmp/llama7b --train-steps 10 --ablation-steps 0 \
    --n-eval 100 --n-gen 24 --n-gen-baseline 4 --out "$KEEP/bench" 2>&1 | log bench-llama7b
  tail -n 50 "$KEEP/bench-llama7b.log"
}

pack() {  # everything under KEEP but weights, checkpoints and TensorBoard logs, as one file that comes back;
  # the chain's final adapter (12 MB) as another, for the CPU work that follows (decoding, export, chat)
  tar czf "$OUT/${1:-results}.tgz" -C "$KEEP" --exclude=checkpoints --exclude=tensorboard --exclude='*.safetensors' .
  local chain
  for chain in "$KEEP/reproduce/chain" "$KEEP/chain"; do
    if [ -d "$chain/2/adapter" ]; then
      tar czf "$OUT/chain-adapter.tgz" -C "$chain/2" adapter
    fi
  done
  ls -la "$OUT"
}

# A figure is only evidence if its GPUs ran nothing else: before each part, any other process on the GPUs it uses
# (GPU $GPU; both for the parts that use both) is named on the console and in $KEEP/contended.txt.
BOTH_GPUS=" ddp ddp7b ddp7b_compile ddp7b_compile2 ddp7b_b64 sweep_gpus "
NOT_MEASURING=" install setup llama7b pack poll "
others_on_gpus() {  # PART: the compute processes already on that part's GPUs, one line each
  [[ $NOT_MEASURING == *" $1 "* ]] && return 0
  local gpus=$GPU
  [[ $BOTH_GPUS == *" $1 "* ]] && gpus=all
  local uuids
  if [ "$gpus" = all ]; then
    uuids=$(nvidia-smi --query-gpu=uuid --format=csv,noheader 2>/dev/null || true)
  else
    uuids=$(nvidia-smi -i "$gpus" --query-gpu=uuid --format=csv,noheader 2>/dev/null || true)
  fi
  [ -n "$uuids" ] || return 0
  nvidia-smi --query-compute-apps=gpu_uuid,pid,process_name --format=csv,noheader 2>/dev/null \
    | grep -F -f <(echo "$uuids") || true
}

while [ $# -gt 0 ]; do
  part=$1
  shift
  echo "== $part $(date +%T)"
  busy=$(others_on_gpus "$part")
  if [ -n "$busy" ]; then
    echo "!! $part starts beside other GPU work, its figures are not evidence: $busy" | tee -a "$KEEP/contended.txt"
  fi
  if [ "$part" = pack ]; then
    pack "${1:-results}"
    shift || true
  elif [ "$part" = poll ]; then
    sleep "${1:-300}"
    tail -n 15 "$KEEP"/chain*.out 2>/dev/null || true
    pack "${2:-results}"
    shift 2 || true
  else
    "$part"
  fi
done
echo "== done $(date +%T)"
