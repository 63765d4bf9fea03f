"""dualpipe_bubble and dualpipe_chunks: pipeline schedules in real Megatron runs on gloo.

dualpipe_bubble: the same dense GPT, data and micro-batches through Megatron's `pretrain`
on 2 pipeline ranks (a core each) under Megatron's 1F1B, Megatron's interleaved 1F1B
(2 virtual stages per rank), DualPipeV (with and without the W split) and DualPipe.
Each rank's bubble fraction is 1 - (forward-compute + backward-compute) /
forward-backward, from Megatron's own timers (`--timing-log-level 2 --timing-log-option
all`, averaged over the last logging interval); the same timers time the cells of the
megaseek schedules (their forwards and backwards are Megatron's `forward_step` and
`backward_step`; W cells count as backward compute). DualPipeV's last step is also read
from its recorded timeline (`--pipeline-timeline`): measured bubble per rank against the
formula with the measured cell durations; its picture goes to bench/figures.

dualpipe_chunks: F, B (input gradient only, split), W and F&B of a DualPipeV chunk of the
MLA+MoE model with EP=2 (PP=2 x DP=2, 4 ranks), from the recorded timeline.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.result import Config, Result, Table

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "bench" / "figures"

MODEL = ["--num-layers", "8", "--hidden-size", "256", "--num-attention-heads", "8",
         "--seq-length", "256", "--max-position-embeddings", "256", "--micro-batch-size", "2",
         "--untie-embeddings-and-output-weights", "--hidden-dropout", "0",
         "--attention-dropout", "0", "--lr", "1e-4", "--lr-warmup-iters", "1",
         "--eval-iters", "0", "--eval-interval", "1000", "--seed", "1234",
         "--timing-log-level", "2", "--timing-log-option", "all"]
SCHEDULES = {  # name -> extra flags
    "1F1B (Megatron)": [],
    "interleaved 1F1B, 2 virtual stages (Megatron)": [
        "--num-virtual-stages-per-pipeline-rank", "2"],  # p2p overlap: Megatron's default
    "DualPipeV": ["--plugins", "dualpipe", "--pipeline-schedule", "dualpipev"],
    "DualPipeV, W split": ["--plugins", "dualpipe", "--pipeline-schedule", "dualpipev",
                           "--delay-wgrad-compute"],
    "DualPipe": ["--plugins", "dualpipe", "--pipeline-schedule", "dualpipe"],
}
MLA_MOE_EP2 = [
    "--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4",
    "--seq-length", "128", "--max-position-embeddings", "128", "--micro-batch-size", "1",
    "--untie-embeddings-and-output-weights", "--hidden-dropout", "0", "--attention-dropout",
    "0", "--lr", "1e-4", "--lr-warmup-iters", "1", "--eval-iters", "0", "--eval-interval",
    "1000", "--seed", "1234", "--pipeline-model-parallel-size", "2",
    "--plugins", "mla", "moe", "dualpipe", "--pipeline-schedule", "dualpipev",
    "--delay-wgrad-compute", "--multi-latent-attention", "--q-lora-rank", "64",
    "--kv-lora-rank", "32", "--qk-head-dim", "32", "--qk-pos-emb-head-dim", "16",
    "--v-head-dim", "32", "--rope-type", "rope", "--normalization", "RMSNorm", "--swiglu",
    "--disable-bias-linear", "--num-experts", "8", "--moe-router-topk", "2",
    "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
    "--moe-router-bias-update-rate", "1e-3", "--moe-ffn-hidden-size", "128",
    "--moe-shared-expert-intermediate-size", "128", "--moe-router-load-balancing-type", "none",
    "--moe-layer-freq", "([0]+[1]*3)", "--expert-model-parallel-size", "2",
]


def _pretrain(args: list[str], ranks: int, workdir: Path) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(ranks), "-m", "integration.pretrain", *args]
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir)
    output = done.stdout + done.stderr
    if done.returncode:
        raise RuntimeError(f"pretrain exited {done.returncode}: {output[-3000:]}")
    return output


def _per_rank_timers(output: str) -> dict[str, dict[int, float]]:
    """The last 'times across ranks (ms)' block Megatron logged: timer -> rank -> ms."""
    blocks = output.split("times across ranks (ms):")
    if len(blocks) < 2:
        raise RuntimeError("Megatron logged no per-rank timers")
    timers: dict[str, dict[int, float]] = {}
    name = None
    for line in blocks[-1].splitlines()[1:]:
        header = re.match(r"^  (\S[^:]*):\s*$", line)
        value = re.match(r"^\s+rank\s+(\d+): ([0-9.]+)", line)
        if header:
            name = header[1]
            timers[name] = {}
        elif value and name:
            timers[name][int(value[1])] = float(value[2])
        elif line.strip() and not value:
            break
    return timers


def _step_ms(output: str) -> list[float]:
    return [float(ms) for ms in re.findall(r"elapsed time per iteration \(ms\): ([0-9.]+)", output)]


def _bubbles(timers: dict[str, dict[int, float]]) -> list[float]:
    whole = timers["forward-backward"]
    compute = {rank: timers.get("forward-compute", {}).get(rank, 0.0)
               + timers.get("backward-compute", {}).get(rank, 0.0) for rank in whole}
    return [1.0 - compute[rank] / whole[rank] for rank in sorted(whole)]


def _timeline(directory: Path):
    from integration.dualpipe_report.run_files import read_run

    timeline, _ = read_run(directory)
    return timeline


def _measured(timeline):
    """(bubble per rank, the formula's bubble, mean cell durations), in seconds."""
    from plugins.dualpipe.simulator import mean_durations, published_bubble

    durations = mean_durations(timeline)
    formula = float(published_bubble(timeline.pipeline.schedule, timeline.pipeline.stages,
                                     durations))
    means = {"F": float(durations.F), "B": float(durations.B), "W": float(durations.W),
             "F&B": float(durations.fb)}
    return [float(b) for b in timeline.bubbles()], formula, means, durations


def run_bubble(smoke: bool = False) -> Result:
    iterations, interval = (2, 1) if smoke else (7, 3)
    microbatches = 4 if smoke else 8
    model = MODEL + ["--global-batch-size", str(2 * microbatches), "--train-iters",
                     str(iterations), "--log-interval", str(interval),
                     "--pipeline-model-parallel-size", "2"]
    if smoke:
        model = [("64" if a in ("256",) else a) for a in model]
    configs, rows, raw = [], [], {}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        timeline_dir = work / "timeline"
        for name, extra in SCHEDULES.items():
            flags = model + extra
            if name == "DualPipeV":
                flags += ["--pipeline-timeline", str(timeline_dir)]
            try:
                output = _pretrain(flags, 2, work)
            except RuntimeError as error:
                configs.append(Config(name, name, str(error)[:300]))
                continue
            steps = [ms / 1e3 for ms in _step_ms(output)[1:]]  # iteration 1 warms up
            bubbles = _bubbles(_per_rank_timers(output))
            configs.append(Config(name, name, steps))
            rows.append([name, f"{statistics.median(steps) * 1e3:.1f}"]
                        + [f"{b:.3f}" for b in bubbles])
            raw[name] = {"step_ms": [s * 1e3 for s in steps], "bubble_fraction": bubbles}
        timeline = _timeline(timeline_dir)
        measured, formula, durations, exact = _measured(timeline)
        from plugins.dualpipe.simulator import simulate

        simulated = [float(b) for b in simulate(timeline.pipeline, exact).bubbles()]
        raw["DualPipeV timeline"] = {"bubble_s": measured, "formula_s": formula,
                                     "simulated_s": simulated, "mean_durations_s": durations}
        if not smoke:
            from integration.dualpipe_report.picture import draw

            FIGURES.mkdir(parents=True, exist_ok=True)
            draw(timeline, FIGURES / "dualpipev-pp2-run.png", exact,
                 title=f"DualPipeV, 2 gloo ranks, {microbatches} micro-batches (measured)")
    table = Table("bubble fraction per rank from Megatron's timers (last logging interval)",
                  ["schedule", "step ms (median)", "rank 0", "rank 1"], rows,
                  right=frozenset({1, 2, 3}))
    span = max(s.end for row in timeline.rows for s in row) if timeline.rows else 0.0
    notes = [
        f"Dense GPT (8 layers, hidden 256, sequence 256, micro-batch 2), fp32, "
        f"{microbatches} micro-batches per step, PP=2 on 2 gloo ranks (one core each); "
        f"Each layout run {repetitions} times, alternating with the other; {iterations} "
        f"iterations a run, logged every {interval}: step times are the logged intervals' "
        "but the first (the warm-up), the timers' bubbles their last interval's, averaged "
        "over the runs.",
        "Bubble fraction = 1 - (forward-compute + backward-compute) / forward-backward, "
        "per rank, from Megatron's timers; communication waits count as bubble.",
        "DualPipeV's recorded last step: measured bubble per rank "
        + ", ".join(f"{b * 1e3:.1f} ms" for b in measured)
        + f" of a {span * 1e3:.1f} ms step; DeepSeek's formula (PP/2-1)(F&B+B-3W) with the "
        f"measured mean durations gives {formula * 1e3:.1f} ms"
        + " (mean F, B, W, F&B: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in durations.items())
        + "); the simulator with those mean durations: "
        + ", ".join(f"{b * 1e3:.1f} ms" for b in simulated)
        + ". The formula and the simulator take every chunk to cost the same; here rank 0's "
        "chunks hold the embedding and the output head with the loss, so the ranks' cells "
        "differ, and rank 1 idles where rank 0 is slower. Without the W split W is 0; the "
        "model is dense, so F&B is a forward then a backward (the overlap is for MoE "
        "all-to-alls, dualpipe_chunks).",
    ]
    return Result("dualpipe_bubble", configs, notes, [table], raw)


def run_chunks(smoke: bool = False) -> Result:
    iterations = 2 if smoke else 4
    flags = MLA_MOE_EP2 + ["--global-batch-size", "8", "--train-iters", str(iterations),
                           "--log-interval", "1"]
    measured = {}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for name, extra in (("sequential F&B", []),
                            ("overlapped F&B", ["--overlap-moe-expert-parallel-comm"])):
            directory = work / name.replace(" ", "-")
            _pretrain(flags + extra + ["--pipeline-timeline", str(directory)], 4, work)
            measured[name] = _measured(_timeline(directory))[2]
    rows = [[cell] + [f"{measured[name][cell] * 1e3:.2f}" for name in measured]
            for cell in ("F", "B", "W", "F&B")]
    notes = [
        "MLA + DeepSeekMoE (8 experts, top-2, shared expert), 4 layers, hidden 128, sequence "
        "128, micro-batch 1, fp32; DualPipeV on PP=2 x DP=2 with EP=2 (4 gloo ranks on 2 "
        "cores: ranks share cores, so times include waiting for a core); W split on. Mean "
        "cell times of the last step over all ranks and chunks; B is a whole backward (a "
        "split one's input-gradient part plus the mean W).",
    ] + [f"{name}: F&B {m['F&B'] * 1e3:.2f} ms against F + B {(m['F'] + m['B']) * 1e3:.2f} ms."
         for name, m in measured.items()] + [
        "With --overlap-moe-expert-parallel-comm the F&B cell runs its forward and its "
        "backward on two threads, chunk 1 on its own expert-parallel communicators; on 2 "
        "cores shared by 4 ranks there is no idle core for the waiting half to hand over "
        "to, so no gain is expected here: the figure that matters needs a GPU per rank.",
    ]
    return Result("dualpipe_chunks", [], notes,
                  [Table("mean cell time (ms)", ["cell", *measured], rows,
                         right=frozenset({1, 2}))],
                  {"mean_durations_s": measured})


# dualpipe_layout: a model whose output head costs about four layers (vocabulary 12800 at
# hidden 256, by integration.cost's FLOPs; DeepSeek-V3's is about 1.4 of its mean layer), so
# that the rank holding it is clearly the long one at toy size.
LAYOUT_MODEL = ["--num-layers", "16", "--hidden-size", "256", "--num-attention-heads", "8",
                "--seq-length", "256", "--max-position-embeddings", "256",
                "--micro-batch-size", "1", "--vocab-size", "12800",
                "--untie-embeddings-and-output-weights", "--disable-bias-linear",
                "--hidden-dropout", "0",
                "--attention-dropout", "0", "--lr", "1e-4", "--lr-warmup-iters", "1",
                "--eval-iters", "0", "--eval-interval", "1000", "--seed", "1234",
                "--timing-log-level", "2", "--timing-log-option", "all",
                "--plugins", "dualpipe", "--pipeline-schedule", "dualpipev"]
LAYOUT_RANKS = (4, 2)  # PP=4 on 4 ranks (2 cores: shared), PP=2 on 2 (a core each)


def _flag(flags: list[str], name: str) -> int:
    return int(flags[flags.index(name) + 1])


_MODEL_SHAPE = ("--num-layers", "--hidden-size", "--num-attention-heads", "--seq-length",
                "--hidden-dropout", "--attention-dropout",
                "--max-position-embeddings", "--micro-batch-size", "--vocab-size",
                "--untie-embeddings-and-output-weights", "--disable-bias-linear")
_SWITCHES = ("--untie-embeddings-and-output-weights", "--disable-bias-linear")


def letter_costs(flags: list[str]) -> dict:
    """The layout letters' costs as `megaseek describe` prints them per stage (training
    FLOPs of one micro-batch, `integration.describe.stage_flops`), over a transformer
    layer's: t = 1, L the final norm, output head and loss, m an MTP layer, E 0 (a lookup)."""
    from fractions import Fraction

    from integration import describe

    shaping = [name for name in flags if name in _MODEL_SHAPE]
    argv = [a for name in shaping for a in
            ([name] if name in _SWITCHES else [name, flags[flags.index(name) + 1]])]
    args = describe.parse(argv)
    model = describe.shape(args)

    def stage(**contents) -> int:
        return describe.stage_flops(model, args, describe.Stage(0, **contents))

    layer = stage(layers=[0])
    return {"E": Fraction(0), "t": Fraction(1), "m": Fraction(stage(layers=[], mtp=1), layer),
            "L": Fraction(stage(layers=[], head=True), layer)}


def _stage_means(timeline) -> list[float]:
    """Each stage's mean F + B (ms) in a recorded timeline: its lone F and B cells."""
    pipeline = timeline.pipeline
    spans = {}
    for rank, row in enumerate(timeline.rows):
        for span in row:
            if span.cell.op in ("F", "B") and not span.cell.split:
                stage = pipeline.place(rank, span.cell.chunk)[1]
                spans.setdefault((stage, span.cell.op), []).append(span.end - span.start)
    return [1e3 * sum(statistics.mean(spans.get((stage, op), [0.0])) for op in ("F", "B"))
            for stage in range(pipeline.stages)]


def _layout_runs(model: list[str], ranks: int, costs: dict, work: Path,
                 repetitions: int) -> dict:
    """Equal stages and the balanced layout under DualPipeV on `ranks` pipeline ranks, one
    after the other `repetitions` times (so that load from elsewhere falls on both alike):
    per layout its step times (all repetitions), the timers' bubbles (their mean), the
    last repetition's timeline, and the simulator's predictions."""
    from fractions import Fraction

    from plugins.dualpipe.layout import StageLayout
    from plugins.dualpipe.program import Pipeline
    from plugins.dualpipe.simulator import Durations, balanced_layout, simulate, stage_weights

    layers = _flag(model, "--num-layers")
    pipeline = Pipeline("dualpipev", ranks, 8, split_backward=False)
    unit = Durations(Fraction(1), Fraction(2), Fraction(0))  # B = 2F, no W split
    layouts = {"equal stages": StageLayout.split(layers, pipeline.stages),
               "balanced layout": balanced_layout(pipeline, layers, costs, unit)}
    steps, bubbles = {name: [] for name in layouts}, {name: [] for name in layouts}
    for repetition in range(repetitions):
        for name, layout in layouts.items():
            directory = work / f"pp{ranks}-{name.replace(' ', '-')}-{repetition}"
            flags = model + ["--pipeline-model-parallel-size", str(ranks),
                             "--pipeline-timeline", str(directory)]
            if name != "equal stages":
                flags += ["--pipeline-model-parallel-layout", str(layout)]
            output = _pretrain(flags, ranks, work)
            steps[name] += _step_ms(output)[1:]  # the first interval holds the warm-up
            bubbles[name].append(_bubbles(_per_rank_timers(output)))
    runs = {}
    for name, layout in layouts.items():
        weights = stage_weights(layout, costs)
        predicted = simulate(pipeline, unit, weights)
        timeline = _timeline(work / f"pp{ranks}-{name.replace(' ', '-')}-{repetitions - 1}")
        runs[name] = {
            "layout": str(layout),
            "step_ms": steps[name],
            "bubble_fraction": [statistics.mean(rank) for rank in zip(*bubbles[name])],
            "bubble_fraction_each_run": bubbles[name],
            "predicted_span_units": float(predicted.makespan),
            "predicted_bubble_fraction": [float(b / predicted.makespan)
                                          for b in predicted.bubbles()],
            "stage_weights": [float(w) for w in weights],
            "timeline_span_ms": float(timeline.makespan) * 1e3,
            "timeline_bubble_ms": [float(b) * 1e3 for b in timeline.bubbles()],
            "stage_f_plus_b_ms": _stage_means(timeline)}
    return runs


def run_layout(smoke: bool = False) -> Result:
    iterations, interval, repetitions = (2, 1, 1) if smoke else (7, 2, 2)
    model = LAYOUT_MODEL + ["--global-batch-size", "8", "--train-iters", str(iterations),
                            "--log-interval", str(interval)]
    if smoke:
        model = [("64" if a == "256" else a) for a in model]
    costs = letter_costs(model)
    raw = {"letter_costs": {k: float(v) for k, v in costs.items()}}
    load_before = os.getloadavg()[0]
    configs, tables = [], []
    with tempfile.TemporaryDirectory() as work:
        for ranks in LAYOUT_RANKS:
            runs = _layout_runs(model, ranks, costs, Path(work), repetitions)
            raw[f"pp{ranks}"] = runs
            columns = [f"rank {r}" for r in range(ranks)]
            timer_rows, timeline_rows = [], []
            equal = runs["equal stages"]
            for name, run in runs.items():
                configs.append(Config(f"PP={ranks}, {name}", f"PP={ranks}, {name} "
                                      f"({run['layout']})", [ms / 1e3 for ms in run["step_ms"]]))
                ratio = statistics.median(run["step_ms"]) / statistics.median(equal["step_ms"])
                timer_rows.append(
                    [f"{name}: {run['layout']}", f"{statistics.median(run['step_ms']):.0f}",
                     f"{ratio:.2f}",
                     f"{run['predicted_span_units'] / equal['predicted_span_units']:.2f}"]
                    + [f"{b:.3f}" for b in run["bubble_fraction"]]
                    + [f"{b:.3f}" for b in run["predicted_bubble_fraction"]])
                timeline_rows.append(
                    [name, f"{run['timeline_span_ms']:.0f}"]
                    + [f"{b:.0f}" for b in run["timeline_bubble_ms"]]
                    + [f"{b / run['timeline_span_ms']:.3f}" for b in run["timeline_bubble_ms"]])
            tables += [
                Table(f"PP={ranks} on {ranks} gloo ranks: step time and bubble fraction per "
                      "rank, from Megatron's timers (last logging interval, mean of the "
                      "runs), beside the simulator's prediction from the FLOPs costs (step: "
                      "over equal stages')",
                      ["layout", "step ms (median)", "step", "predicted step", *columns,
                       *[f"{c} predicted" for c in columns]], timer_rows,
                      right=frozenset(range(1, 4 + 2 * ranks))),
                Table(f"PP={ranks}: the last step's recorded timeline (--pipeline-timeline): "
                      "span and bubble per rank (ms), and the bubble's fraction of the span "
                      "(the last run)",
                      ["layout", "span ms", *[f"{c} ms" for c in columns],
                       *[f"{c} fraction" for c in columns]], timeline_rows,
                      right=frozenset(range(1, 2 + 2 * ranks)))]
    load_after = os.getloadavg()[0]
    raw["load_average_1min"] = [load_before, load_after]
    layers, hidden = _flag(model, "--num-layers"), _flag(model, "--hidden-size")
    notes = [
        f"Dense GPT ({layers} layers, hidden {hidden}, sequence {_flag(model, '--seq-length')}, "
        f"vocabulary {_flag(model, '--vocab-size')}, untied head, micro-batch 1), fp32, 8 "
        "micro-batches per step, DualPipeV without the W split: PP=4 on 4 gloo ranks (8 "
        "stages, rank r holding stages r and 7-r; 4 ranks share the 2 cores) and PP=2 on 2 "
        "(4 stages, a core each); rank 0 holds the embedding and the head. "
        f"Each layout run {repetitions} times, alternating with the other; {iterations} "
        f"iterations a run, logged every {interval}: step times are the logged intervals' "
        "but the first (the warm-up), the timers' bubbles their last interval's, averaged "
        "over the runs.",
        "Stage costs as `megaseek describe` prints them per stage (training FLOPs of a "
        "micro-batch, integration.describe.stage_flops): a transformer layer 1, the output head "
        f"{float(costs['L']):.2f}, the embedding 0 (a lookup). The balanced layout is the "
        "cut (one layer a stage at least) whose busiest rank carries the least, and of "
        "those the shortest step the simulator gives with those costs (F = 1, B = 2, no "
        "W; `plugins.dualpipe.simulator.balanced_layout`); `megaseek schedule --schedule "
        "dualpipev --pp P --microbatches 8 --w 0 --pipeline-model-parallel-layout LAYOUT "
        f"--layer-costs L={float(costs['L']):.3f}` prints the predicted figures.",
        "Bubble fraction = 1 - (forward-compute + backward-compute) / forward-backward, per "
        "rank, from Megatron's timers; communication waits and waits for a core count as "
        "bubble. With 4 ranks on 2 cores a rank that waits frees its core for the others, "
        "so the step follows the total work more than the busiest rank's; PP=2 on 2 ranks "
        "is the figure the balance is for. Other work on the machine waits for the same "
        "cores (load average " + " -> ".join(f"{x:.1f}" for x in (load_before, load_after))
        + " over the run, 1-minute).",
        "Measured F + B per stage (ms, the lone F and B cells of the last step), stage 0 "
        "first: " + "; ".join(
            f"PP={ranks} {name}: " + ", ".join(f"{v:.0f}" for v in run["stage_f_plus_b_ms"])
            for ranks in LAYOUT_RANKS for name, run in raw[f"pp{ranks}"].items()) + ".",
    ]
    return Result("dualpipe_layout", configs, notes, tables, raw)
