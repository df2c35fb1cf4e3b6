#!/usr/bin/env bash
# The GPU checks, as one script for a machine with a CUDA device and no network: the CUDA tests of the
# quantised modules (tests/test_quant_cuda.py) and the QLoRA step against HF PEFT + bitsandbytes
# (benches/bench_qlora_cuda.py). It needs torch, transformers and peft there, and the oxpeft wheel (plus
# bitsandbytes' wheel, for the comparison) in .whl/; build it here with
#     maturin build --release -o .whl   (and: pip download --no-deps bitsandbytes==0.50.2 -d .whl)
# Logs go to $OUT (or ./device-out).
set -uo pipefail
out=${OUT:-device-out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/oxpeft-site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/oxpeft-site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
python3 -c "import torch, oxpeft; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'oxpeft', oxpeft.__version__)" 2>&1 | tee -a "$out/gpu.txt"
timeout 300 python3 -m pytest tests/test_quant_cuda.py -q -p no:cacheprovider -rs 2>&1 | tee "$out/cuda-tests.log"
timeout 240 python3 benches/bench_qlora_cuda.py 2>&1 | tee "$out/qlora-cuda.log"
