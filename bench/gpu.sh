#!/usr/bin/env bash
# GPU benchmarks of issue 4, for one call of the lent GPU machine (at most 600 s a call, 30 min a session).
#
#   bench/gpu.sh PART[,PART...]        in the repo root, with .gpu/ carried (the FlashInfer bundle)
#
# PART   what (device-time estimates for an H100; compile times are the big unknown)
# tests  pytest -m gpu tests/test_gpu.py                    -> tests.log    ~2-5 min (six compiled engines)
# qwen   Qwen3-0.6B shape: B offline throughput (256 requests) with the byte model; D decode step time at
#        batch 1/16/64/256 for eager, compile, compile + CUDA graphs; E transformers continuous batching and
#        padded generate on the first $HF_REQUESTS requests, nanoserve on the same ones -> qwen.log, qwen.json
#                                                                          ~8-9 min (the budget caps it)
# llama  Llama-3.1-8B shape: C batch-1 decode and its HBM roofline fraction (graphs; eager for comparison)
#                                                               -> llama.log, llama.json       ~3 min
# startup  F: LLM() for the Qwen3-0.6B shape in fresh processes, cold then warm inductor cache
#                                                               -> startup.log, startup.json   ~2-3 min
# quant  issue 12: Llama-3.1-8B shape decode at batch 1 and 16 with a random W4A16 checkpoint (tinygemm), FP8
#        and int8 on the fly (QUANT_KINDS picks)                -> quant.log, quant.json        ~4-6 min
#        (not in "all")
# all    every part in turn: does NOT fit one 600 s call. Plan: "tests" first (the GPU path's first run:
#        a failure there makes the figures meaningless), then "llama,startup", then "qwen", one call each.
#
# Every step runs under `timeout`, and the whole call under a deadline (BUDGET_S, default 570 s from the start):
# a step that would pass it is cut short or skipped, so the summary table is always printed, last.
# Logs and JSON go to $OUT (at most 8 files: env.log plus one .log and one .json per part).
# Knobs (environment): OUT, BUDGET_S, HF_REQUESTS (transformers' share of the workload, default 32), PY, and
# QWEN_STEPS, the qwen part's steps in order (default "offline decode-graphs hf-generate-batch hf-generate
# decode-compile decode-eager": targets first), e.g. QWEN_STEPS="decode-compile decode-eager" to finish a cut run.
# SMOKE=1 runs every part on the CPU with the tiny shape and tiny workloads (no bundle, no GPU needed):
#   SMOKE=1 PY=.venv/bin/python OUT=/tmp/gpu-out bash bench/gpu.sh all

PARTS=${1:?usage: bench/gpu.sh tests|qwen|llama|startup|all[,...]}
cd "$(dirname "$0")/.." || exit 1
START_S=$SECONDS

# FlashInfer from the bundle, exactly as /work/shared/gpu/README.md says. FLASHINFER_DISABLE_JIT stays unset:
# the bundle has never run on a GPU, and if the engine asks for a kernel variant it lacks, compiling it here
# (16 cores, tens of seconds to minutes) costs less than a failed call; the end of the run lists every module
# that was JIT-compiled (they land under $FLASHINFER_WORKSPACE_BASE), so a gap in the bundle is visible.
# Skipped when the device command already ran the one-liner itself (FLASHINFER_WORKSPACE_BASE is then set).
if [ -z "${SMOKE:-}" ] && [ -z "${FLASHINFER_WORKSPACE_BASE:-}" ]; then
  fi_site=$(mktemp -d) && tar -xJf .gpu/flashinfer-*.tar.xz -C $fi_site && python3 -m pip install -q --no-index --no-deps --target $fi_site .gpu/apache_tvm_ffi-*.whl && export PYTHONPATH=$fi_site:$PYTHONPATH FLASHINFER_WORKSPACE_BASE=$fi_site/ws CUDA_HOME=/usr/local/cuda || { echo "FlashInfer bundle: unpacking failed (is .gpu/ carried?)"; exit 1; }
fi
set -uo pipefail

PY=${PY:-python3}
OUT=${OUT:-$PWD/gpu-out}
BUDGET_S=${BUDGET_S:-570}
HF_REQUESTS=${HF_REQUESTS:-32}
mkdir -p "$OUT"
PIECES=$(mktemp -d)  # per-step logs and JSON, merged into $OUT per part
# nanoserve is not installed there: run it from the tree. Unbuffered, so a step cut short still logs its output.
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if [ -n "${SMOKE:-}" ]; then
  DEVICE=cpu QWEN=tiny LLAMA=tiny
  OFFLINE=(--num-requests 8 --min-input 8 --max-input 32 --min-output 8 --max-output 32 --max-num-seqs 8)
  HF_REQUESTS=4
  DECODE=(--device cpu --batch-sizes 1,4 --steps 5 --max-model-len 256)
  LLAMA_DECODE=(--device cpu --batch-sizes 1 --steps 5 --max-model-len 256)
  DECODE_CONFIGS="compile eager"  # CUDA graphs need a GPU
  LLAMA_CONFIG=compile
  STARTUP=(--device cpu --max-num-seqs 8)
  QUANT_KINDS=${QUANT_KINDS:-w4a16 int8}  # FP8 needs a GPU
else
  DEVICE=cuda QWEN=qwen3-0.6b LLAMA=llama-3.1-8b
  OFFLINE=()  # the protocol: 256 requests, input and output lengths uniform in [100, 1024], temperature 0.6
  DECODE=(--batch-sizes 1,16,64,256 --steps 50 --prompt-len 32 --max-model-len 2048)
  LLAMA_DECODE=(--prompt-len 128 --max-model-len 4096)
  DECODE_CONFIGS="graphs compile eager"
  LLAMA_CONFIG=graphs
  STARTUP=()
fi

# step NAME LIMIT_S CMD...: run CMD under `timeout` (capped by what is left of the budget), its output to
# $PIECES/NAME.log and the part's log; the tail goes to stdout, where the device tool keeps the last 12,000 chars.
step() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET_S - (SECONDS - START_S) - 20))  # 20 s kept for merging and the summary
  if ((left < 30)); then
    echo "== $name: SKIPPED, budget spent" | tee -a "$OUT/$PART.log"
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit}s, at $((SECONDS - START_S))s)" | tee -a "$OUT/$PART.log"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" >"$PIECES/$name.log" 2>&1
  local rc=$?
  cat "$PIECES/$name.log" >>"$OUT/$PART.log"
  tail -n 14 "$PIECES/$name.log"
  ((rc == 124 || rc == 137)) && rc="$rc (timed out)"
  echo "== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$OUT/$PART.log"
}

merge() {  # merge the part's JSON pieces into $OUT/PART.json
  local pieces=("$PIECES/$PART"-*.json)
  [ -e "${pieces[0]}" ] && $PY bench/gpu_bench.py merge --out "$OUT/$PART.json" "${pieces[@]}" >/dev/null
}

environment() {
  {
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), parts: $PARTS, smoke: ${SMOKE:-no}"
    git log -1 --format='commit: %h %s' 2>/dev/null; git status --short 2>/dev/null | head -20
    # The device machine gets a copy of the tree without .git: this hash names the code that ran.
    echo "source hash: $(find nanoserve bench tests -name '*.py' | sort | xargs cat | sha1sum | cut -c1-12)"
    command -v nvidia-smi >/dev/null && nvidia-smi
    nproc; free -g | head -2
    $PY - <<'EOF'
import sys, torch, transformers
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| transformers", transformers.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}: {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}")
    import flashinfer
    print("flashinfer", flashinfer.__version__, "from", flashinfer.__file__)
EOF
  } 2>&1 | tee "$OUT/env.log"
}

part_tests() {
  if [ ! -f tests/test_gpu.py ]; then
    echo "tests/test_gpu.py does not exist" | tee -a "$OUT/tests.log"
    return
  fi
  step tests 420 $PY -m pytest -m gpu -q -p no:cacheprovider -rs tests/test_gpu.py
}

part_qwen() {
  local name
  for name in ${QWEN_STEPS:-offline decode-graphs hf-generate-batch hf-generate decode-compile decode-eager}; do
    case $name in
      offline)  # B, and nanoserve on E's share of the workload; one process: the engine compiles once
        step qwen-offline 300 $PY bench/throughput.py --shape $QWEN --device $DEVICE "${OFFLINE[@]}" \
          --peers nanoserve --hf-num-requests $HF_REQUESTS --quiet --json "$PIECES/qwen-offline.json" ;;
      decode-*)  # D: one process per engine set-up (each has the GPU to itself; the inductor cache is warm)
        [[ " $DECODE_CONFIGS " == *" ${name#decode-} "* ]] || continue
        step qwen-$name 150 $PY bench/gpu_bench.py decode-one --shape $QWEN --config ${name#decode-} \
          "${DECODE[@]}" --json "$PIECES/qwen-$name.json" ;;
      hf-*)  # E: transformers on the first $HF_REQUESTS requests (same seed, same fingerprint), own time limit
        step qwen-$name 150 $PY bench/throughput.py --shape $QWEN --device $DEVICE "${OFFLINE[@]}" --peers $name \
          --hf-num-requests $HF_REQUESTS --no-bandwidth --quiet --json "$PIECES/qwen-$name.json" ;;
      *) echo "unknown qwen step $name" ;;
    esac
  done
}

part_llama() {
  # C: batch-1 decode (and 16, 64 for the curve) with the default engine, then eager at batch 1 for comparison.
  step llama-decode-main 330 $PY bench/gpu_bench.py decode-one --shape $LLAMA --config $LLAMA_CONFIG \
    --batch-sizes 1,16,64 --steps 200 "${LLAMA_DECODE[@]}" --json "$PIECES/llama-decode-main.json"
  step llama-decode-eager 150 $PY bench/gpu_bench.py decode-one --shape $LLAMA --config eager --batch-sizes 1 \
    --steps 100 "${LLAMA_DECODE[@]}" --json "$PIECES/llama-decode-eager.json"
}

part_quant() {
  # Issue 12: batch-1 (and 16) decode of the Llama-3.1-8B shape with quantized weights, each against the roofline
  # of its own bytes: a random W4A16 checkpoint on tinygemm, FP8 and int8 on the fly (llama part: bf16).
  local q
  for q in ${QUANT_KINDS:-w4a16 fp8 int8}; do
    step quant-$q 150 $PY bench/gpu_bench.py decode-one --shape $LLAMA --config $LLAMA_CONFIG --quantization $q \
      --batch-sizes 1,16 --steps 100 "${LLAMA_DECODE[@]}" --json "$PIECES/quant-$q.json"
  done
}

part_startup() {
  step startup 420 $PY bench/gpu_bench.py startup --shape $QWEN "${STARTUP[@]}" --child-timeout 200 \
    --json "$PIECES/startup-runs.json"
}

environment
[ "$PARTS" = all ] && PARTS=tests,qwen,llama,startup
for PART in ${PARTS//,/ }; do
  case $PART in
    tests | qwen | llama | startup | quant) "part_$PART"; merge ;;
    *) echo "unknown part $PART (tests, qwen, llama, startup, quant, all)"; exit 2 ;;
  esac
done

if [ -n "${FLASHINFER_WORKSPACE_BASE:-}" ]; then
  jit=$(find "$FLASHINFER_WORKSPACE_BASE" -name '*.so' 2>/dev/null)
  echo "FlashInfer modules JIT-compiled in this call (not in the bundle): ${jit:-none}" | tee -a "$OUT/env.log"
fi
echo "total $((SECONDS - START_S))s; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
shopt -s nullglob
results=("$OUT"/*.json)
((${#results[@]})) && $PY bench/gpu_bench.py summary "${results[@]}"
