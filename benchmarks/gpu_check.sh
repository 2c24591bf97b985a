#!/usr/bin/env bash
# Issue 13, item 6, in one run on a machine with a CUDA GPU: the CUDA tests, then the statistics benchmarks on
# the GPU (CUDA-event times, with the GPU named), and where the statistics wait for the device.
#
# Usage, from the repository root: bash benchmarks/gpu_check.sh [output folder]
# (default: $OUT where set, else ./gpu_check). Needs torch with CUDA, numpy, tqdm and pytest; tunnelgraph
# itself is read from this checkout (PYTHONPATH), not installed. About 5-8 minutes on an H100.
set -o pipefail
out=${1:-${OUT:-gpu_check}}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
status=0
"$python" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())" \
    2>&1 | tee "$out/device.txt" || exit 1
"$python" -m pytest tests/statistics/test_cuda.py tests/statistics/test_solve.py tests/statistics/test_matrix_free.py \
    -q -rs -p no:cacheprovider 2>&1 | tee "$out/tests.txt" || status=1
"$python" benchmarks/bench_network.py --device cuda --repeats 3 --json "$out/network_cuda.json" 2>&1 \
    | tee "$out/network_cuda.txt" || status=1
"$python" benchmarks/cuda_syncs.py 2>&1 | tee "$out/syncs.txt" || status=1
"$python" benchmarks/bench_statistics.py --paper-cnn-only --oracle-columns 1 --json "$out/statistics.json" \
    > "$out/statistics.txt" 2>&1 || status=1
tail -n 40 "$out/statistics.txt"
exit $status
