#!/usr/bin/env bash
# The speed issue's GPU check in one command, for a lent GPU machine (the device tool's `run`), where
# python3 holds a CUDA torch and triton but not this project's few pure-Python extras.
#
# Once, here (a machine with pip and the package registries), in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform any -d .whl tomli_w peer-pytorch einx frozendict
# Then, as the device tool's command (carry [".whl"], timeout_s 600):
#   bash tools/gpu_bench.sh [PARTS]        # PARTS: peer bench gpu --parts (default ops,layer,step)
# It writes $OUT/gpu_<device>.json (commit it under results/bench/), $OUT/gpu_bench.log and the CUDA
# tests' log. Budget: the benchmark is built to finish within 8 minutes on an H100; the tests ~1 minute.
set -uo pipefail
out=${OUT:-/tmp/peer_gpu}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 2
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
name=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())" 2>/dev/null || echo gpu)
# the Triton kernels against the reference on the device first (a minute), then the benchmark
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/ops/test_mix.py -k "cuda" 2>&1 | tee "$out/tests_cuda.log"
timeout 490 python3 -m peer bench gpu --parts "${1:-ops,layer,step}" --out "$out/gpu_${name}.json" 2>&1 \
  | tee "$out/gpu_bench.log"
