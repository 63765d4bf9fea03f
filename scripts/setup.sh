#!/usr/bin/env bash
# Creates .venv with megaseek and its pinned dependencies. Idempotent: a stamp records
# what was installed, so a second run with an unchanged recipe returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${MEGASEEK_VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_PIN="torch==2.13.0"          # the CPU wheel; never an unpinned torch (it pulls CUDA)
MCORE_PIN="megatron-core==0.19.2"
DEPS=(numpy "packaging>=24.2" psutil triton pytest pytest-xdist pytest-timeout "matplotlib==3.11.2"
      "tensorboard==2.21.0")  # matplotlib: `megaseek schedule --png`, the demo plot; tensorboard: Megatron's --tensorboard-dir
TEST_DEPS=("transformers==4.57.1")  # Hugging Face DeepseekV3: the test oracle for MLA and MoE

recipe="typing-override-pth $TORCH_PIN $MCORE_PIN ${DEPS[*]} ${TEST_DEPS[*]-} $(sha1sum pyproject.toml | cut -c1-12)"
stamp="$VENV/.megaseek-setup"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$recipe" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }

if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  pip install -q "$TORCH_PIN"
fi
# numpy and packaging first: --ignore-requires-python below would otherwise pick sources
# that need Python 3.12 (shared/notes/megatron-core-on-cpu.md).
pip install -q "${DEPS[@]}" ${TEST_DEPS[@]+"${TEST_DEPS[@]}"}
# megatron-core 0.19.2 declares Python >= 3.12 but its cp311 wheel works on 3.11.
pip install -q --ignore-requires-python --no-deps "$MCORE_PIN"
pip install -q --no-deps --no-build-isolation -e .
# Python 3.11 only: every interpreter of this venv gets typing.override (new in 3.12), which
# megatron.training imports (upstream.compat TYPING_OVERRIDE). `integration` provides it
# on import, but processes that Megatron spawns from a launched script (the checkpoint
# writer's multiprocessing Manager re-imports the script as its main) never import it.
"$VENV/bin/python" - <<'PY'
import pathlib, site, sys
if sys.version_info < (3, 12):
    pth = pathlib.Path(site.getsitepackages()[0]) / "megaseek-typing-override.pth"
    pth.write_text("import typing, typing_extensions; typing.override = getattr("
                   "typing, 'override', typing_extensions.override)\n")
PY

echo "$recipe" > "$stamp"
