#!/usr/bin/env bash
# The GPU checks of worker.step (issue: the worker's step on a GPU at kernel speed), in one
# call, on a lent machine (its python3 holds a CUDA PyTorch; nothing can be installed there
# from the network). What it needs beyond that machine's packages travels as wheels in .whl:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl google-crc32c==1.7.1
# and the call carries it: run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=600).
# Results land in $OUT (or ./gpu-out): the pytest log, system_cuda.json (eager, compiled and
# graph step times per ratio side by side) and bench_estimator_cuda.json.
set -uo pipefail
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 GRPC_VERBOSITY=ERROR
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
python3 -c "import google_crc32c" 2>/dev/null || {
  echo "bench/gpu.sh: google-crc32c is missing; carry it as a wheel in .whl (see the top of"\
       "this script)" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
  | tee -a "$OUT/gpu.txt"
step() { echo "== $*" | tee -a "$OUT/steps.txt"; local t0=$SECONDS; "$@"; local rc=$?;
         echo "== rc=$rc in $((SECONDS - t0))s" | tee -a "$OUT/steps.txt"; return $rc; }
# 1. the accelerated steps give the eager step's numbers on CUDA (and everything else of
#    the step on the CPU, as in CI)
step timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_step.py 2>&1 \
  | tee "$OUT/test_step.log"
# 2. per-ratio client step time, eager / compiled / graph side by side, largest shipped models
step timeout 330 python3 -m bench.system --preset gpu --parts ratio --device cuda \
  --steps eager,compiled,graph --out "$OUT" 2>&1 | tee "$OUT/system.log"
# 3. the estimators against exact products on CUDA (time and peak memory)
step timeout 150 python3 -m bench.estimator --device cuda --steps eager,compiled \
  --workloads A/mlp,A/cnn,A/resnet --repeats 5 --json \
  > "$OUT/bench_estimator_cuda.json" 2> "$OUT/estimator.log"
tail -3 "$OUT/estimator.log"
echo "bench/gpu.sh: done; results in $OUT"
