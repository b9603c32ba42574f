#!/usr/bin/env bash
# The GPU report on a lent device machine (its python3 has torch and CUDA; no venv, no network).
# Wheels in .whl pin transformers, tokenizers and huggingface_hub to this project's versions (see README).
#   hack/device-report.sh smoke   CUDA engine tests + one small shape through every section
#   hack/device-report.sh full    the report: SHAPES, SECTIONS, BUDGET_SECONDS, DECODE_TOKENS, TRIALS from the environment
#   hack/device-report.sh bench   CUDA engine tests, then benchmarks/bench_plan_scale (one core), bench_reload and
#                                 bench_offload; their JSON goes to $OUT (default reports/) named by GPU and preset;
#                                 PARTS (default "tests plan_scale reload offload") picks some
#   hack/device-report.sh decode  the engine's fast path: its CUDA tests (graphs = eager tokens), then
#                                 benchmarks/bench_decode for DECODE_PRESETS at batch 1 and 16, r in 1 and 0.5
#                                 (stream), prompts of 512 and 4096 tokens; JSON into $OUT
#   hack/device-report.sh predictor  issue 28's error goals: the curves of SHAPES (default the three report shapes
#                                 at 12 layers each, so that they fit the time) with TRIALS (default 5) interleaved
#                                 trials a point, then the calibration tables; report.json into $OUT
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-full}
out=${OUT:-reports}
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/worker:$PWD/operator PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.gen.max,pcie.link.width.current --format=csv
python3 -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, torch.version.cuda, transformers.__version__, torch.cuda.get_device_name())"
lscpu | grep -E "Model name|^CPU\(s\)|Flags" | cut -c1-200
# models in RAM (tmpfs) when it has room: the from_pretrained baseline then reads at memory speed, too
models=/tmp/report-models
if [ "$(df --output=avail -B1G /dev/shm 2>/dev/null | tail -1)" -ge 40 ] 2>/dev/null; then models=/dev/shm/report-models; fi
df -h /dev/shm /tmp | cat
residency() { python3 -c 'from residency.cli import app; app()' "$@"; }
case $mode in
  smoke)
    timeout 240 python3 -m pytest -q -p no:cacheprovider -x tests/component/test_engine_cuda.py 2>&1 | tail -25
    residency report --shapes qwen2.5-0.5b --sequence-lengths 512,4096 --decode-tokens 8 --trials 1 \
      --models "$models" --out "$out" --budget-seconds "${BUDGET_SECONDS:-150}" 2>&1 | tail -120
    ;;
  full)
    residency report --shapes "${SHAPES:-qwen2.5-0.5b,qwen2.5-3b,llama-3-8b}" --decode-tokens "${DECODE_TOKENS:-8}" \
      --trials "${TRIALS:-1}" --models "$models" --out "$out" --budget-seconds "${BUDGET_SECONDS:-420}" \
      --sections "${SECTIONS:-preemption,peers,pageable,curves}" 2>&1 | tail -150
    ;;
  bench)
    mkdir -p "$out"
    gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
    parts=" ${PARTS:-tests plan_scale reload offload} "
    [[ $parts == *" tests "* ]] && timeout 240 python3 -m pytest -q -p no:cacheprovider tests/component/test_engine_cuda.py 2>&1 | tail -5
    [[ $parts == *" plan_scale "* ]] && timeout 300 taskset -c 3 python3 benchmarks/bench_plan_scale.py 2>&1 | tail -12
    [[ $parts == *" plan_scale "* ]] && mv benchmarks/results/plan_scale.json "$out/plan_scale_device_host.json"
    [[ $parts == *" reload "* ]] || RELOAD_PRESETS=" "
    [[ $parts == *" offload "* ]] || OFFLOAD_PRESETS=" "
    for preset in ${RELOAD_PRESETS:-qwen2.5-3b}; do
      timeout 300 python3 benchmarks/bench_reload.py --preset "$preset" --layers 0 --trials 3 2>&1 | tail -16
      mv "benchmarks/results/bench_reload_$gpu.json" "$out/bench_reload_${gpu}_$preset.json"
    done
    for preset in ${OFFLOAD_PRESETS:-qwen2.5-0.5b qwen2.5-3b}; do
      timeout 300 python3 benchmarks/bench_offload.py --preset "$preset" --layers 0 --trials 3 --decode-tokens 16 2>&1 | tail -16
      mv "benchmarks/results/bench_offload_$gpu.json" "$out/bench_offload_${gpu}_$preset.json"
    done
    ;;
  decode)
    mkdir -p "$out"
    timeout 300 python3 -m pytest -q -p no:cacheprovider tests/component/test_engine_cuda.py \
      tests/component/test_engine_fastpath.py 2>&1 | tail -8
    for preset in ${DECODE_PRESETS:-qwen2.5-0.5b qwen2.5-3b llama-3-8b}; do
      for fraction in 1 0.5; do
        for prompt in 512 4096; do
          timeout 240 python3 benchmarks/bench_decode.py --preset "$preset" --batches 1,16 --fraction "$fraction" \
            --prompt-tokens "$prompt" --new-tokens 128 --trials 5 2>&1 | tail -4
        done
      done
    done
    cp benchmarks/results/bench_decode_*.json "$out/" 2>/dev/null
    ;;
  predictor)  # never into reports/<gpu>/, where the committed full report lives
    [ -n "${OUT:-}" ] || out=/tmp/predictor-report
    residency report --shapes "${SHAPES:-qwen2.5-0.5b:12,qwen2.5-3b:12,llama-3-8b:12}" --sections curves \
      --sequence-lengths 512,4096 --decode-tokens "${DECODE_TOKENS:-16}" --trials "${TRIALS:-5}" --models "$models" \
      --out "$out" --budget-seconds "${BUDGET_SECONDS:-420}" 2>&1 | tail -40
    for report in "$out"/*/report.json; do python3 -m residency_worker.report.calibration "$report"; done
    ;;
  *) echo "usage: $0 smoke|full|bench|decode|predictor" >&2; exit 2 ;;
esac
