#!/usr/bin/env bash
# The GPU check (under 8 minutes on one GPU): the CUDA tests, then the bench model's decode tok/s
# on the GPU at bf16/int8/int4 beside transformers' generate on the same GPU.
#   bash bench/gpu_check.sh            (PYTHON=/path/to/python to choose the interpreter)
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c 'import sys, torch; ok = torch.cuda.is_available(); print(torch.__version__, torch.cuda.get_device_name() if ok else "no CUDA GPU: nothing to check"); sys.exit(0 if ok else 2)' || exit 2
echo "== CUDA tests"
timeout 300 "$PY" -m pytest -q -rs tests/test_device.py tests/test_kernels.py -k "cuda or gpu or sync_free or one_token" -p no:cacheprovider
tests=$?
echo "== decode on the GPU"
timeout 240 "$PY" bench/gpu_decode.py --tokens 64 --repeat 3
bench=$?
echo "== tests rc=$tests bench rc=$bench"
[ "$tests" = 0 ] && [ "$bench" = 0 ]
