#!/usr/bin/env bash
# The core's CUDA checks, in one run on a CUDA machine (the lent GPU; vLLM is not needed there):
# the CUDA tests, a check that the ordering test catches a missing copy-stream wait, then the
# two GPU benchmarks. Writes logs and results under $OUT (the device tool's folder) or runs/gpu-check.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
python=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$out/gpu.txt"
$python -c "import torch, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__)" | tee -a "$out/gpu.txt"

echo "== CUDA tests"
timeout 180 $python -m pytest -q -m cuda tests/core/test_cuda.py -p no:cacheprovider 2>&1 | tee "$out/test_cuda.log"
echo "== the same ordering tests with the copy stream no longer waiting for the compute stream (must fail)"
timeout 120 $python - <<'PY' 2>&1 | tail -4 | tee -a "$out/test_cuda.log"
import pytest, torch
torch.cuda.Stream.wait_stream = lambda self, other: None
rc = pytest.main(["-q", "-m", "cuda", "tests/core/test_cuda.py", "-k", "waits_for_queued", "-p", "no:cacheprovider"])
print("mutation (no wait_stream):", "CAUGHT by the tests" if rc != 0 else "NOT CAUGHT")
PY

echo "== benchmarks"
[ -n "${SKIP_TRANSFER:-}" ] || timeout 180 $python benchmarks/gpu_expert_transfer.py --out "$out/gpu_expert_transfer.json" 2>&1 | tee "$out/gpu_expert_transfer.log"
timeout 300 $python benchmarks/gpu_offload_step.py --out "$out/gpu_offload_step" ${OFFLOAD_STEP_ARGS:-} 2>&1 | tee "$out/gpu_offload_step.log"
