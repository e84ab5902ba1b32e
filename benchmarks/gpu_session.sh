#!/usr/bin/env bash
# What a session lent a GPU machine runs there (issues 4 and 5), one stage per device call:
#
#   bash benchmarks/gpu_session.sh build     # build _cpu and _cuda in place, list the backends (~1 min)
#   bash benchmarks/gpu_session.sh test      # build, then the Triton/CUDA/ops/pipeline tests for real (~3 min)
#   bash benchmarks/gpu_session.sh scoring   # build, then bench_scoring low-rank and --fullrank on the GPU (~3 min)
#   bash benchmarks/gpu_session.sh e2e       # build, llama2-7b synthetic data (25 GiB), bench_end_to_end --device cuda
#
# It uses the machine's own python3 (torch, triton, transformers, peft, safetensors, pybind11 are
# there; mergekit is not, so its tests skip and the mergekit contender is left out). Logs and JSON
# go to $OUT (the device tool brings them back) or to ./gpu-out. Copy the tables into
# benchmarks/RESULTS.md with the GPU's name and the date. pyproject.toml's SPDX licence string needs
# setuptools >= 77 there; if the build stops on it, carry a newer setuptools wheel (device README).
set -euo pipefail
cd "$(dirname "$0")/.."
stage="${1:-test}"
out="${OUT:-gpu-out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"

build() {
  SAFEMERGE_BUILD_CUDA=1 "$PY" setup.py -q build_ext --inplace 2>&1 | tee "$out/build.log" | grep -i "safemerge-ext build" || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  PYTHONPATH=. "$PY" -m safemerge_ext backends | tee -a "$out/build.log"
}

case "$stage" in
  build)
    build ;;
  test)
    build
    set -o pipefail
    PYTHONPATH=. "$PY" -m pytest -q -ra -p no:cacheprovider tests/test_backend_triton.py tests/test_backend_native.py \
      tests/test_ops.py tests/test_pipeline.py 2>&1 | tee "$out/test.log" | tail -40 ;;
  scoring)
    build
    PYTHONPATH=. "$PY" benchmarks/bench_scoring.py --device cuda --out "$out/scoring-gpu.json" 2>&1 | tee "$out/scoring.log"
    PYTHONPATH=. "$PY" benchmarks/bench_scoring.py --device cuda --fullrank --shapes 4096x4096,1024x4096,14336x4096 \
      --out "$out/fullrank-gpu.json" 2>&1 | tee "$out/fullrank.log" ;;
  e2e)
    build
    PYTHONPATH=. "$PY" benchmarks/make_synthetic.py --shape llama2-7b
    PYTHONPATH=. "$PY" benchmarks/bench_end_to_end.py --shape llama2-7b --device cuda --skip mergekit ${E2E_SKIP:-} \
      --json "$out/e2e-llama2-7b-cuda.json" 2>&1 | tee "$out/e2e.log" ;;
  *)
    echo "usage: $0 build|test|scoring|e2e" >&2
    exit 2 ;;
esac
