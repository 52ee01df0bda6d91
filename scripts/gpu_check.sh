#!/usr/bin/env bash
# The GPU half of issue 6 in one device call: the trainer's CUDA paths (tests/engine/test_cuda.py:
# AMP bf16 and fp16, fused optimizers, exact resume, CPU/GPU agreement, DDP over NCCL) and the
# bench/train.py jobs on the GPU, each baseline on the same GPU in the same run.
#
#   bash scripts/gpu_prepare.sh                   # here, once: fills .gpu/ (wheels, datasets)
#   device run: command "bash scripts/gpu_check.sh", carry [".gpu"], timeout_s 590
#   bash scripts/gpu_check.sh 05-cifar            # only the stages named (after a stage timed out)
#
# Each stage writes $OUT/<stage>.txt as it goes (its own time limit, summing to 560 s), so a call that
# runs out of time still brings back every stage that finished.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-out}"
mkdir -p "$OUT"
site=/tmp/imagerec-gpu-site
python3 -m pip install -q --no-index --no-deps --target "$site" .gpu/wheels/*.whl > "$OUT/00-install.txt" 2>&1 \
  || { echo "wheel install failed:"; tail -5 "$OUT/00-install.txt"; }
export PYTHONPATH="$PWD/src:$site"
export CUBLAS_WORKSPACE_CONFIG=:4096:8  # deterministic cuBLAS, for --deterministic runs
# bench/train.py and the test suite read ../shared/datasets beside the checkout.
if [ ! -e ../shared/datasets ]; then mkdir -p ../shared && ln -sfn "$PWD/.gpu/datasets" ../shared/datasets; fi

stage() {  # stage NAME SECONDS COMMAND...: run it unless other stages were named
  local name=$1 limit=$2
  shift 2
  if [ -n "$WANTED" ] && [[ " $WANTED " != *" $name "* ]]; then return; fi
  echo "== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "rc=$? after $((SECONDS - start)) s" >> "$OUT/$name.txt"
  tail -n 4 "$OUT/$name.txt"
}
WANTED="$*"
stage 01-facts 20 sh -c 'nvidia-smi; python3 -c "import sys, torch; print(sys.version, torch.__version__, torch.cuda.get_device_name(0))"'
stage 02-tests 120 python3 -m pytest -q -m gpu tests/engine/test_cuda.py -s
stage 03-throughput 80 python3 bench/train.py throughput --device cuda --runs 3
stage 04-mnist 100 python3 bench/train.py mnist --device cuda --runs 3 --baseline-runs 1
stage 05-cifar 240 python3 bench/train.py cifar --device cuda --runs 3 --baseline-runs 1 \
  --train-args "--model airbench94 --epochs 10"
