"""Where the tests' files are, for tests in any folder under tests/ (and for the scripts and
subprocesses they start, which run from the repository root)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
# Scripts a launch test hands to `megaseek launch` or torchrun; release/ mirrors Megatron-LM's
# release `pretrain_gpt.py` (with its imports).
LAUNCH_SCRIPTS = TESTS / "launch_scripts"
RELEASE_SCRIPT = LAUNCH_SCRIPTS / "release" / "pretrain_gpt.py"
