"""The demo's loss plot and summary, read from a Megatron run's log (`integration.demo`).

    python -m integration.demo_report runs/demo/train.log --png runs/demo/losses.png

Reads Megatron's own log lines: the iteration lines (`lm loss`, `mtp_1 loss`, `elapsed
time per iteration (ms)`, `global batch size`), the validation lines (the EMA plugin's
`validation loss (EMA weights) ...` beside Megatron's), the argument dump (`seq_length`)
and the MoE plugin's `moe layer i: load max/mean X` lines. Plots training, MTP,
validation and EMA-validation losses (those the log has) and prints the summary last.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path

_ITERATION = re.compile(r"\biteration\s+(\d+)/\s*\d+ \|(.*)")
_FIELD = re.compile(r"([A-Za-z_0-9 ()]+?):\s+([-+0-9.Ee]+)\s*\|")
_VALIDATION = re.compile(r"validation loss( \(EMA weights\))? at iteration (\d+)( on (validation|test) set)? "
                         r"\| lm loss value: ([-+0-9.Ee]+)")
_MOE = re.compile(r"moe layer (\d+): load max/mean ([0-9.]+)")
_SEQ_LENGTH = re.compile(r"^\s*seq_length \.+ (\d+)\s*$")


@dataclass
class Run:
    """What the log says, by iteration."""

    train: dict[int, float] = field(default_factory=dict)
    mtp: dict[int, float] = field(default_factory=dict)  # the first MTP depth's loss
    validation: dict[int, float] = field(default_factory=dict)
    ema_validation: dict[int, float] = field(default_factory=dict)
    iteration_ms: dict[int, float] = field(default_factory=dict)  # averaged since the last line
    batch_size: int | None = None
    seq_length: int | None = None
    expert_load: list[tuple[int, dict[int, float]]] = field(default_factory=list)  # (iteration, {layer: max/mean})


def read(log: str) -> Run:
    """The run as its log tells it. The MoE plugin's line of a step comes before Megatron's
    iteration line of that step (the optimizer-step hook runs first) and names no
    iteration: it is the next iteration line's."""
    run, pending, it = Run(), [], 0
    for line in log.splitlines():
        if m := _ITERATION.search(line):
            it = int(m.group(1))
            run.expert_load += [(it, loads) for loads in pending]
            pending = []
            fields = {k.strip(): float(v) for k, v in _FIELD.findall(m.group(2) + "|")}
            if "lm loss" in fields:
                run.train[it] = fields["lm loss"]
            if "mtp_1 loss" in fields:
                run.mtp[it] = fields["mtp_1 loss"]
            if "elapsed time per iteration (ms)" in fields:
                run.iteration_ms[it] = fields["elapsed time per iteration (ms)"]
            if "global batch size" in fields:
                run.batch_size = int(fields["global batch size"])
        elif m := _VALIDATION.search(line):
            ema, it, split, value = m.group(1), int(m.group(2)), m.group(4), float(m.group(5))
            if split != "test":
                (run.ema_validation if ema else run.validation)[it] = value
        elif m := _MOE.search(line):
            pending.append({int(layer): float(x) for layer, x in _MOE.findall(line)})
        elif m := _SEQ_LENGTH.match(line):
            run.seq_length = int(m.group(1))
    run.expert_load += [(it, loads) for loads in pending]
    return run


def tokens_per_second(run: Run) -> float | None:
    """Tokens over time of the logged intervals, the first (start-up) left out."""
    if not (run.batch_size and run.seq_length) or len(run.iteration_ms) < 2:
        return None
    its = sorted(run.iteration_ms)
    seconds = sum(run.iteration_ms[b] * (b - a) / 1e3 for a, b in zip(its, its[1:]))
    return (its[-1] - its[0]) * run.batch_size * run.seq_length / seconds


def plot(run: Run, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for series, label, style in ((run.train, "training loss", "-"), (run.mtp, "MTP loss (mtp_1)", "--"),
                                 (run.validation, "validation loss", "o-"),
                                 (run.ema_validation, "validation loss, EMA weights", "s-")):
        if series:
            its = sorted(series)
            ax.plot(its, [series[i] for i in its], style, label=label)
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy (nats per byte)")
    ax.set_title("megaseek demo: DeepSeek-V3's recipe at toy size")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _last(series: dict[int, float]) -> str:
    if not series:
        return "-"
    it = max(series)
    return f"{series[it]:.3f} (iteration {it})"


def summary(run: Run, png: Path, log: Path, tensorboard: Path | None = None,
            wall_seconds: float | None = None) -> list[str]:
    lines = ["", "== demo summary " + "=" * 56]
    if wall_seconds is not None:
        lines.append(f"wall time          {wall_seconds:.0f} s, {max(run.train, default=0)} iterations")
    lines.append(f"training loss      {_last(run.train)}")
    if run.mtp:
        lines.append(f"MTP loss (mtp_1)   {_last(run.mtp)}")
    lines.append(f"validation loss    {_last(run.validation)}")
    if run.ema_validation:
        lines.append(f"  with EMA weights {_last(run.ema_validation)}")
    speed = tokens_per_second(run)
    if speed is not None:
        per_iteration = run.batch_size * run.seq_length
        lines.append(f"throughput         {speed:.0f} tokens/s ({run.batch_size} x {run.seq_length} "
                     f"= {per_iteration} tokens per iteration)")
    if run.expert_load:
        (first_it, first), (last_it, last) = run.expert_load[0], run.expert_load[-1]
        shown = ", ".join(f"{last[k]:.2f}" for k in sorted(last))
        was = ", ".join(f"{first[k]:.2f}" for k in sorted(first))
        lines.append(f"expert load        max/mean tokens per expert {shown} at iteration "
                     f"{last_it} ({was} at {first_it}; 1.00 = even)")
        lines.append("                   (the MoE layers of pipeline rank 0, which the moe "
                     "plugin logs)")
    lines.append(f"loss plot          {png}")
    lines.append(f"whole log          {log}")
    if tensorboard is not None:
        has_events = tensorboard.is_dir() and any(tensorboard.rglob("events.out.tfevents*"))
        lines.append(f"TensorBoard        {tensorboard}" if has_events else
                     f"TensorBoard        none written (the tensorboard package is not installed)")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path)
    parser.add_argument("--png", type=Path, default=None, help="default: losses.png beside the log")
    parser.add_argument("--tensorboard", type=Path, default=None)
    parser.add_argument("--wall-seconds", type=float, default=None)
    args = parser.parse_args(argv)
    png = args.png or args.log.with_name("losses.png")
    run = read(args.log.read_text(errors="replace"))
    if not run.train:
        raise SystemExit(f"demo_report: no iteration line in {args.log}")
    plot(run, png)
    print("\n".join(summary(run, png, args.log, args.tensorboard, args.wall_seconds)), flush=True)


if __name__ == "__main__":
    main()
