#!/usr/bin/env bash
# The CUDA checks in one run on one GPU, in under 10 minutes:
#   1. pytest -m gpu (every test marked gpu);
#   2. merge_bench's CUDA rows: the in-place proxy against the device (HBM) copy floor, the
#      host-streamed proxy (merge.delta_device: host) against the host-to-device copy floor,
#      both floors measured in the same run;
#   3. eval_bench's CUDA row (lm-eval against the fast engine, accuracy compared);
#   4. train_bench in bf16 (the demix loop against a bare torch loop).
# Prints the ratios beside their targets and writes them to OUT_DIR/gpu_check.txt (the measured
# numbers to OUT_DIR/gpu_check.json; each step's output to OUT_DIR/<step>.log).
#
# Usage: bash benchmarks/gpu_check.sh [--cpu] [--data DIR] [OUT_DIR]
#   OUT_DIR   default: $OUT when set, else gpu_check
#   --cpu     dry run of the same steps on the CPU with tiny sizes and generated evaluation data
#             (about a minute; the targets are not judged)
#   --data    the demo data folder for the evaluation step (default data/demo; it must hold
#             the demo corpus and eval/, as `demix data fetch-demo --out data/` leaves it)
#   PYTHON    the interpreter (default: python)
# Exit status: 0 when every step gave its result (and, on CUDA, every target was met).
set -uo pipefail
cd "$(dirname "$0")/.."

device=cuda
data=data/demo
out=${OUT:-gpu_check}
while [ $# -gt 0 ]; do
  case $1 in
    --cpu) device=cpu ;;
    --data) data=$2; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) out=$1 ;;
  esac
  shift
done
PY=${PYTHON:-python}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export TQDM_DISABLE=1 HF_DATASETS_DISABLE_PROGRESS_BARS=1  # keep the logs to the results
mkdir -p "$out"

if [ "$device" = cuda ]; then
  merge_sizes=(--hidden 1024 --layers 8 --vocab 32000 --components 7 --repeats 5)
  eval_args=(--data "$data" --no-fetch --limit 60 --repeats 3)
  train_sizes=(--hidden 512 --layers 4 --seq-len 512 --batch 16 --steps 60 --repeats 3)
else
  merge_sizes=(--hidden 64 --layers 2 --vocab 512 --components 3 --repeats 3)
  eval_args=(--synthetic --limit 8 --repeats 1 --batch-size 8 --tokenizer-documents 40)
  train_sizes=(--hidden 32 --layers 1 --seq-len 32 --batch 4 --steps 6 --repeats 1 --docs 200)
fi

failed=()
step() {  # step NAME COMMAND...: run it, its output to the terminal and OUT_DIR/NAME.log
  local name=$1
  shift
  echo "== $name: $*"
  if ! "$@" 2>&1 | tee "$out/$name.log"; then
    failed+=("$name")
  fi
}

gpu_tests=$(grep -l "mark.gpu" tests/test_*.py | tr '\n' ' ')
# shellcheck disable=SC2086  # one word per test file
step pytest "$PY" -m pytest -m gpu -q -p no:cacheprovider $gpu_tests --junitxml "$out/pytest.xml"
step merge "$PY" benchmarks/merge_bench.py --device "$device" --host-deltas "${merge_sizes[@]}" \
  --json "$out/merge.json"
step eval "$PY" benchmarks/eval_bench.py --device "$device" --attention sdpa "${eval_args[@]}" \
  --json "$out/eval.json"
step train "$PY" benchmarks/train_bench.py --device "$device" --dtype bfloat16 --processes 0 \
  "${train_sizes[@]}" --json "$out/train.json"

echo "== report: $out/gpu_check.txt"
"$PY" benchmarks/gpu_check_report.py "$out" --device "$device"
report=$?
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed steps: ${failed[*]} (see their logs in $out)"
  exit 1
fi
if [ "$device" = cuda ] && grep -q "MISSED" "$out/gpu_check.txt"; then
  exit 1
fi
exit $report
