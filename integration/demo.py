"""The README's demo: DeepSeek-V3's whole training recipe on a tiny GPT (`--preset tiny`),
on CPU, through Megatron's own training loop, on 4 gloo ranks and the built-in byte-level
corpus.

Every plugin is on by default: `mla` (Multi-head Latent Attention, with recomputation of
the RMSNorms and up-projections), `moe` (DeepSeek-V3 MoE layers, the experts split over 2
expert-parallel ranks, FP8 dispatch), `fp8` (every linear's GEMMs in block-scaled FP8 on
the emulated backend), `dualpipe` (DualPipeV over 2 pipeline ranks), `ema` (an EMA of the
weights, evaluated beside them), and the preset's multi-token prediction layer (`mtp`).
`--no-<name>` (or `--without <name>`) switches one off with the flags only it needs; the
rest keeps running. Every other argument goes to Megatron, after the demo's (so it wins).

The whole log goes to `<out>/train.log` (`--out DIR`, default `runs/demo`), TensorBoard's
events to `<out>/tensorboard`; the screen shows the progress lines, then
`integration.demo_report` plots the losses to `<out>/losses.png` and prints the summary.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

# 4 ranks: 2 pipeline ranks (DualPipeV's V: 4 stages of one layer) x 2 data-parallel ranks,
# which are also the 2 expert-parallel ranks. FP8 needs whole 128-tiles per rank: no TP.
RANKS = 4
MODEL = ["--preset", "tiny"]  # integration/presets.py: the model and its plugins' shapes
LAYOUT = ["--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size", "1"]
TRAINING = [
    # 4 micro-batches of 4 per data-parallel rank: the fewest DualPipeV on 2 ranks runs.
    "--micro-batch-size", "4", "--global-batch-size", "32", "--train-iters", "70",
    "--lr", "2e-3", "--min-lr", "2e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "10",
    "--weight-decay", "0.1", "--clip-grad", "1.0", "--seed", "1234",
    "--log-interval", "5", "--eval-interval", "20", "--eval-iters", "2",
]

# What each switch removes besides the preset's flags of that plugin (`--plugins` drops
# those): the run's settings that only that plugin reads.
PLUGINS: dict[str, list[str]] = {
    "mla": ["--recompute-granularity", "selective", "--recompute-modules", "layernorm",
            "mla_up_proj"],
    "moe": ["--expert-model-parallel-size", "2"],
    "fp8": ["--fp8-backend", "emulated"],
    "dualpipe": ["--pipeline-schedule", "dualpipev"],  # without it: Megatron's 1F1B, PP=2
    "ema": ["--ema-decay", "0.95", "--ema-eval"],
}
SWITCHES = (*PLUGINS, "mtp")  # mtp is a model flag of the preset, not a plugin
NO_MTP = ["--mtp-num-layers", "0"]
DEFAULT_OUT = Path("runs/demo")


def switched_off(extra: list[str]) -> tuple[list[str], list[str]]:
    """(the names `--no-<name>` / `--without <name>` switch off, the other arguments)."""
    off, rest, i = [], [], 0
    while i < len(extra):
        arg = extra[i]
        if arg == "--without" and i + 1 < len(extra):
            name, i = extra[i + 1], i + 2
        elif re.fullmatch(r"--no-\w+", arg) and arg[5:] in SWITCHES:
            name, i = arg[5:], i + 1
        else:
            rest.append(arg)
            i += 1
            continue
        if name not in SWITCHES:
            raise SystemExit(f"demo: nothing called {name!r} to switch off "
                             f"(switches: {', '.join(SWITCHES)})")
        off.append(name)
    return off, rest


def _merged_plugins(argv: list[str]) -> list[str]:
    """argv with one `--plugins` flag, last, naming the demo's plugins and any the user added."""
    names, rest, taking = [], [], False
    for arg in argv:
        if arg == "--plugins":
            taking = True
        elif taking and not arg.startswith("--"):
            names.append(arg)
        else:
            taking = False
            rest.append(arg)
    return rest + ["--plugins", *dict.fromkeys(names)]


def megatron_arguments(extra: list[str], out: Path = DEFAULT_OUT) -> list[str]:
    """`integration.pretrain`'s arguments for the demo with `extra` (switches and Megatron
    flags, which come last and so win)."""
    off, extra = switched_off(extra)
    on = [name for name in PLUGINS if name not in off]
    logging = ["--tensorboard-dir", str(out / "tensorboard"), "--log-validation-ppl-to-tensorboard"]
    return _merged_plugins([*MODEL, *LAYOUT, *TRAINING, *logging, "--plugins", *on,
                            *(flag for name in on for flag in PLUGINS[name]),
                            *(NO_MTP if "mtp" in off else []), *extra])


def command(extra: list[str], out: Path = DEFAULT_OUT) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(RANKS), "-m", "integration.pretrain",
            *megatron_arguments(extra, out)]


# The lines of Megatron's log the screen shows (train.log has all), less what says nothing
# in this run (the time stamp, loss scale, skipped and NaN iterations, one node's share).
PROGRESS = re.compile(r"\biteration\s+\d+/|validation loss|^megaseek:|^moe layer|^ ema:")
QUIET = re.compile(r"^\s*\[[^]]*\]\s*|\s*(consumed samples|loss scale|number of skipped iterations"
                   r"|number of nan iterations):\s*[^|]*\|| tokens per node [0-9.]+")


def shown(line: str) -> str:
    return QUIET.sub("", line.rstrip())


def _out_dir(argv: list[str]) -> tuple[Path, list[str]]:
    if "--out" in argv:
        i = argv.index("--out")
        return Path(argv[i + 1]), argv[:i] + argv[i + 2:]
    return DEFAULT_OUT, argv


def train(cmd: list[str], log_path: Path) -> int:
    """Runs `cmd`, all of its output to `log_path`, the progress lines to the screen."""
    env = dict(os.environ, TORCHDYNAMO_DISABLE=os.environ.get("TORCHDYNAMO_DISABLE", "1"),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONWARNINGS=os.environ.get("PYTHONWARNINGS", "ignore"), PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        log.write(f"demo: {' '.join(cmd)}\n")
        process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            log.write(line)
            if PROGRESS.search(line):
                print(shown(line), flush=True)
        return process.wait()


def main(argv: list[str] | None = None) -> None:
    out, extra = _out_dir(list(sys.argv[1:] if argv is None else argv))
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train.log"
    cmd = command(extra, out)
    print(f"demo: training on {RANKS} gloo ranks; the whole log goes to {log_path}", flush=True)
    start = time.monotonic()
    code = train(cmd, log_path)
    wall = time.monotonic() - start
    if code != 0:
        print("\n".join(log_path.read_text().splitlines()[-40:]), file=sys.stderr)
        raise SystemExit(f"demo: the training exited with {code}; the whole log is {log_path}")
    from integration import demo_report

    demo_report.main([str(log_path), "--png", str(out / "losses.png"),
                      "--tensorboard", str(out / "tensorboard"), "--wall-seconds", f"{wall:.0f}"])


if __name__ == "__main__":
    main()
