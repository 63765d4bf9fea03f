"""The `ema` plugin: the host EMA against a synchronous EMA of the weights recorded at each
step (oracle), through Megatron's training loop on 1 and 2 gloo ranks (TP=2; the
distributed optimizer at DP=2); save/resume; a worker failure; the EMA evaluation pass;
the start-up checks.

Run as a script (under torchrun) this file is `integration.pretrain` with one more test
plugin, `ema_oracle`, which records the owned weights after every step, applies the EMA
formula synchronously, and at the last iteration compares it with the plugin's EMA.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from plugins.config import flag, megatron

REPO = Path(__file__).resolve().parents[3]  # run as a script too: not through tests.helpers


# --- the oracle plugin (used when this file runs under torchrun) -------------------------

@dataclass(frozen=True)
class OracleConfig:
    oracle_trace: str | None = flag("--oracle-trace", None, type=str,
                                     help="file for the result")
    oracle_tensorboard: str | None = flag(
        "--oracle-tensorboard", None, type=str,
        help="record Megatron's TensorBoard scalars (last rank) in this file")
    oracle_fail_last_update: bool = flag("--oracle-fail-last-update", False,
                                         action="store_true",
                                         help="the EMA update of the last iteration raises")
    train_iters: int | None = megatron("train_iters")


class _RecordingWriter:
    """Megatron's TensorBoard writer as its callers use it (SummaryWriter's `add_scalar`;
    other methods do nothing), each scalar a line `tag<TAB>step<TAB>value`: tensorboard is
    not installed here, so Megatron would make no writer of its own."""

    def __init__(self, path: str) -> None:
        self.path = path

    def add_scalar(self, tag, value, step, *unused, **unused_kw) -> None:
        with open(self.path, "a") as f:
            f.write(f"{tag}\t{step}\t{float(value)!r}\n")

    def __getattr__(self, name):
        return lambda *unused, **unused_kw: None


def _oracle_step(config, model_chunks, optimizer, ema_runs: list):
    """`ema_runs`: the ema plugin's run state of this process (one run)."""
    from plugins.ema.ema import owned_shards

    (run,) = ema_runs
    last_rank = torch.distributed.get_world_size() - 1
    if config.oracle_tensorboard and torch.distributed.get_rank() == last_rank:
        from megatron.training import global_vars

        global_vars._GLOBAL_TENSORBOARD_WRITER = _RecordingWriter(config.oracle_tensorboard)
    shards = owned_shards(model_chunks, optimizer)

    def weights():  # the owned weights, flat, FP32: the layout of HostEMA.ema
        return torch.cat([s.source.detach().float().cpu().reshape(-1) for s in shards])

    oracle = [weights()]  # the EMA starts at the weights the optimizer was built with
    # ... or at the weights loaded from a checkpoint without EMA (_OracleState).
    object.__setattr__(model_chunks[0], "ema_oracle_restart", lambda: oracle.__setitem__(0, weights()))
    ema_config = run.config
    decay, interval, start = ema_config.ema_decay, ema_config.ema_interval, ema_config.ema_start_iter

    def after_step(iteration: int) -> None:
        if config.oracle_fail_last_update:
            if iteration == config.train_iters - 1:  # the EMA's update for it has started
                run.ema.apply = _broken_update
            return
        w = weights()
        if iteration < start:
            oracle[0] = w.clone()
        elif iteration % interval == 0:
            oracle[0].mul_(decay).add_(w, alpha=1.0 - decay)
        if iteration == config.train_iters:
            ema = run.ema
            ema.wait()
            # Same formula, same FP32 operations in the same order on the same layout:
            # the background update is expected bit for bit.
            error = (ema.ema - oracle[0]).abs().max().item() if oracle[0].numel() else 0.0
            moved = (ema.ema - w).abs().max().item() if w.numel() else 0.0
            rank = torch.distributed.get_rank()
            with open(config.oracle_trace, "a") as f:
                f.write(f"{rank} owned {w.numel()} error {error!r} moved {moved!r}\n")

    return after_step


def _broken_update(*unused):
    raise ValueError("disk on fire")


class _OracleState:
    """Told when a checkpoint is loaded: the oracle then starts from the loaded weights."""

    def __init__(self, model_chunks) -> None:
        self.model_chunks = model_chunks

    def sharded_state_dict(self):
        return {}

    state_dict = sharded_state_dict  # --ckpt-format torch

    def load_state_dict(self, state) -> None:
        self.model_chunks[0].ema_oracle_restart()


def _main(argv):
    sys.path.insert(0, str(REPO))
    from integration import pretrain
    import dataclasses
    import functools

    from plugins import Plugin, PluginRegistry, builtin_plugins
    from plugins.ema.plugin import EMARun

    ema_runs: list = []  # the EMA of this process's run, as the ema plugin makes it

    def ema_run(config) -> EMARun:
        ema_runs.append(EMARun(config))
        return ema_runs[-1]

    oracle = Plugin("ema_oracle", "test: a synchronous EMA of the recorded weights",
                    config=OracleConfig,
                    on_optimizer_step=functools.partial(_oracle_step, ema_runs=ema_runs),
                    checkpoint_state=lambda config, chunks: _OracleState(chunks))
    registry = PluginRegistry([dataclasses.replace(plugin, run_state=ema_run)
                               if plugin.name == "ema" else plugin
                               for plugin in builtin_plugins()] + [oracle])
    if argv[:1] == ["ema-export"]:  # `megaseek ema-export` of a run that had the oracle
        from integration import checkpoint_tool, ema_export

        checkpoint_tool.main(argv[1:], "ema-export", ema_export, registry)
    else:
        pretrain.main(argv, registry=registry)


# --- through Megatron's training loop ---------------------------------------------------

# This file runs as the rank script, so the repository goes first on its path; what was on
# the path stays (a GPU machine may carry megatron-core there).
_REPO_FIRST_ON_PATH = {"PYTHONPATH": os.pathsep.join(
    filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

def _train(args, tmp_path, ranks=2):
    from tests.helpers.training_runs import TINY_GPT, torchrun

    return torchrun([str(Path(__file__).resolve())], TINY_GPT + args, tmp_path, ranks=ranks,
                    env=_REPO_FIRST_ON_PATH)


def _oracle_results(trace: Path) -> dict[int, tuple[int, float, float]]:
    found = re.findall(r"^(\d+) owned (\d+) error (\S+) moved (\S+)$", trace.read_text(), re.M)
    return {int(r): (int(n), float(e), float(m)) for r, n, e, m in found}


def _mla_moe_ep2() -> list[str]:
    """DeepSeek's MoE in the second layer, experts split over 2 ranks (imported when
    called: this file also runs as each rank's script, where `tests` is not importable)."""
    from tests.helpers.training_runs import mla_moe_ep2

    return mla_moe_ep2("([0]+[1]*1)")


def _with_plugins(args: list[str], *plugins: str) -> list[str]:
    """`args` with `plugins` added to its --plugins list (one list: Megatron keeps the last)."""
    if "--plugins" not in args:
        return ["--plugins", *plugins, *args]
    at = args.index("--plugins")
    return args[:at + 1] + list(plugins) + args[at + 1:]


def _assert_oracle(trace: Path, ranks: int) -> dict[int, tuple[int, float, float]]:
    results = _oracle_results(trace)
    assert sorted(results) == list(range(ranks))
    for rank, (owned, error, moved) in results.items():
        assert owned > 0
        assert error == 0.0, f"rank {rank}: EMA differs from the oracle by {error}"
        assert moved > 0.0, f"rank {rank}: the EMA equals the weights (no averaging?)"
    return results


# The oracle at TP=2, PP=2, EP=2 (MLA + MoE) and with the distributed optimizer runs in
# the checkpoint tests below, whose saving runs carry it.
@pytest.mark.slow
@pytest.mark.parametrize("ema, ranks", [
    (["--ema-decay", "0.9", "--ema-interval", "3", "--ema-start-iter", "2"], 1),
    (["--ema-decay", "0.95", "--ema-interval", "2"], 2),  # DDP: DP=2 split the EMA
], ids=["1rank", "ddp-dp2"])
def test_ema_equals_synchronous_oracle(ema, ranks, tmp_path):
    trace = tmp_path / "oracle.txt"
    _train(["--plugins", "ema", "ema_oracle", *ema, "--train-iters", "7",
            "--oracle-trace", str(trace)], tmp_path, ranks=ranks)
    results = _assert_oracle(trace, ranks)
    if ranks == 2:  # data parallelism splits the EMA: the two ranks own about half each
        total = sum(owned for owned, _, _ in results.values())
        assert all(abs(owned - total / 2) <= total * 0.05 for owned, _, _ in results.values())


def _checkpoint(directory: Path, iteration: int) -> dict[str, torch.Tensor]:
    from tests.helpers.training_runs import checkpoint_tensors

    return checkpoint_tensors(directory, iteration)


_VALIDATION_LINE = re.compile(r"validation loss (\(EMA weights\) )?at iteration (\d+)"
                              r"( on \w+ set)? \| lm loss value: ([0-9.E+-]+)")


def _validations_from(output: str, iteration: int) -> list[tuple[str, int, str, float]]:
    """Every validation line from `iteration` on, in order: (EMA or not, iteration, set,
    loss)."""
    return [(ema, int(i), where, float(loss)) for ema, i, where, loss
            in _VALIDATION_LINE.findall(output) if int(i) >= iteration]


@pytest.mark.slow
def test_resume_continues_the_ema_and_evaluates_it(tmp_path):
    """6 iterations straight vs 3 + resume from the iteration-3 checkpoint (distributed
    optimizer, DP=2): the saved EMA is identical. With --ema-eval each evaluation prints a
    second line for the EMA weights, on the same batches, without moving the validation
    data: after the resume both losses are the straight run's. The straight run also
    checks the oracle."""
    straight, resumed, trace = tmp_path / "straight", tmp_path / "resumed", tmp_path / "oracle.txt"
    ema = ["--ema-decay", "0.7", "--use-distributed-optimizer", "--ema-eval",
           "--train-iters", "6", "--save-interval", "3", "--eval-interval", "2",
           "--eval-iters", "1"]
    out_a = _train(["--plugins", "ema", "ema_oracle", *ema, "--save", str(straight),
                    "--oracle-trace", str(trace)], tmp_path)
    out_b = _train(["--plugins", "ema", *ema, "--save", str(resumed), "--load", str(straight),
                    "--ckpt-step", "3"], tmp_path)
    _assert_oracle(trace, 2)
    after_resume = _validations_from(out_a, 4)
    assert {(ema, i) for ema, i, _, _ in after_resume} >= {("", 4), ("(EMA weights) ", 4)}
    assert _validations_from(out_b, 4) == after_resume

    a, b = _checkpoint(straight, 6), _checkpoint(resumed, 6)
    assert a.keys() == b.keys()
    weights = {k for k in a if not k.startswith(("optimizer.", "megaseek:"))}
    assert "embedding.word_embeddings.weight" in weights
    # One EMA per weight, sharded like it (the model's key, prefixed).
    assert {k for k in a if k.startswith("megaseek:")} == {"megaseek:ema." + k for k in weights}
    assert all(a["megaseek:ema." + k].shape == a[k].shape for k in weights)
    # The whole checkpoint is identical: the EMA continued exactly, and the run with
    # --ema-eval trained the same weights (each EMA evaluation restored them bit for bit).
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"resumed run differs in {differing[:5]}"

    ema_lines = re.findall(r"validation loss \(EMA weights\) at iteration (\d+) \| "
                           r"lm loss value: ([0-9.E+-]+)", out_a)
    raw_lines = re.findall(r"validation loss at iteration (\d+) on validation set \| "
                           r"lm loss value: ([0-9.E+-]+)", out_a)
    assert {i for i, _ in ema_lines} >= {"2", "4", "6"}
    assert raw_lines


def _torch_format_ema(directory: Path, iteration: int) -> dict[str, torch.Tensor]:
    """The EMA of a --ckpt-format torch checkpoint (one file: one model-parallel rank)."""
    files = sorted(directory.glob(f"iter_{iteration:07d}/mp_rank_*/model_optim_rng.pt"))
    assert len(files) == 1, files
    return torch.load(files[0], map_location="cpu", weights_only=False)["megaseek:ema"]


@pytest.mark.slow
def test_ema_saves_and_resumes_in_the_torch_format(tmp_path):
    """--ckpt-format torch (pickled, written by data-parallel rank 0 alone) with MLA, MoE
    and SwiGLU, whose sharded state holds local factories that cannot be pickled: the EMA
    is saved as plain tensors, gathered on every rank (DP=2), and a resume from iteration
    2 continues it exactly: its iteration-4 EMA is the straight run's."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    model = _mla_moe_ep2()
    assert model[-2:] == ["--expert-model-parallel-size", "2"]
    common = _with_plugins(model[:-2], "ema") + [  # EP=1: both ranks hold every expert
        "--ema-decay", "0.7", "--ckpt-format", "torch", "--train-iters", "4",
        "--save-interval", "2"]
    _train(common + ["--save", str(straight)], tmp_path)
    loaded = _train(common + ["--save", str(resumed), "--load", str(straight),
                              "--ckpt-step", "2"], tmp_path)
    assert "the checkpoint holds no EMA" not in loaded
    a, b = _torch_format_ema(straight, 4), _torch_format_ema(resumed, 4)
    assert a.keys() == b.keys() and len(a) > 10
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"the resumed EMA differs in {differing[:5]}"
    weights = torch.load(next(straight.glob("iter_0000004/mp_rank_*/model_optim_rng.pt")),
                         map_location="cpu", weights_only=False)["model"]
    word = weights["embedding.word_embeddings.weight"]
    assert any(v.shape == word.shape and not torch.equal(v, word) for v in a.values())


def _final_ema_validation_loss(output: str) -> float:
    found = re.findall(r"validation loss \(EMA weights\) at iteration \d+ on validation set \| "
                       r"lm loss value: ([0-9.E+-]+)", output)
    assert found, "no final EMA validation loss in the output"
    return float(found[-1])


def _save_then_load(tmp_path, common: list[str], saved_at: list[str]) -> tuple[str, str]:
    """Trains 5 iterations on 2 ranks with the oracle and --ema-eval at the layout `saved_at`
    and saves; loads the checkpoint at TP = PP = EP = 1 without its optimizer (DP=2 then,
    each rank keeping half of the EMA). Returns both outputs; the saving run's EMA equalled
    the oracle's."""
    trace, ckpt = tmp_path / "oracle.txt", tmp_path / "ckpt"
    common = common + ["--ema-eval", "--train-iters", "5"]
    saved = _train(_with_plugins(common + saved_at, "ema", "ema_oracle")
                   + ["--save", str(ckpt), "--save-interval", "5", "--oracle-trace", str(trace)],
                   tmp_path)
    _assert_oracle(trace, 2)
    loaded = _train(_with_plugins(common, "ema")
                    + ["--load", str(ckpt), "--no-load-optim", "--no-load-rng"], tmp_path)
    assert "the checkpoint holds no EMA" not in loaded
    return saved, loaded


def _same_ema_loss(saved: str, loaded: str, tolerance: float) -> None:
    from tests.helpers.training_runs import final_validation_loss

    assert _final_ema_validation_loss(loaded) == pytest.approx(
        _final_ema_validation_loss(saved), abs=tolerance)
    # and the EMA is not the weights (whose loss Megatron prints on its own line)
    assert abs(final_validation_loss(loaded) - _final_ema_validation_loss(loaded)) > 1e-4


@pytest.mark.slow
def test_ema_saved_at_pp2_loads_at_pp1(tmp_path):
    """The EMA reshards as the weights do: saved at PP=2 (a layer a stage; the last stage's
    copy of the tied embedding is not saved twice), loaded at PP=1."""
    saved, loaded = _save_then_load(tmp_path, ["--ema-decay", "0.7"],
                                    ["--pipeline-model-parallel-size", "2"])
    _same_ema_loss(saved, loaded, 1e-5)  # fp32 on CPU; PP=2 vs DP=2 sum in other orders


@pytest.mark.slow
def test_mla_moe_ema_saved_at_ep2_loads_at_ep1(tmp_path):
    """The experts' EMA reshards with the experts: saved at EP=2 (two experts a rank),
    loaded at EP=1 (DP=2 over the experts: each rank keeps half of every expert's EMA)."""
    mla_moe_ep2 = _mla_moe_ep2()
    at = mla_moe_ep2.index("--expert-model-parallel-size")
    model = mla_moe_ep2[:at] + mla_moe_ep2[at + 2:]
    ema = ["--ema-decay", "0.9", "--ema-start-iter", "2"]
    saved, loaded = _save_then_load(tmp_path, model + ema, ["--expert-model-parallel-size", "2"])
    # fp32 on CPU; EP changes only the order in which expert outputs are summed.
    _same_ema_loss(saved, loaded, 1e-5)


def _tensorboard(path: Path) -> dict[str, dict[int, list[float]]]:
    """tag -> step -> the values written, in order."""
    scalars: dict[str, dict[int, list[float]]] = {}
    for line in path.read_text().splitlines():
        tag, step, value = line.split("\t")
        scalars.setdefault(tag, {}).setdefault(int(step), []).append(float(value))
    return scalars


@pytest.mark.slow
def test_ema_at_tp2_reshards_exports_and_logs(tmp_path):
    """One checkpoint saved at TP=2 (with the oracle), and what reads it:
    - the EMA loads at TP=1 and evaluates to the same loss (it reshards as the weights do);
    - `megaseek ema-export` (no torchrun: it starts its 2 ranks itself) writes the EMA as the
      weights of an ordinary checkpoint, no optimizer or EMA state, which plain Megatron
      loads at TP=1 on 1 rank and evaluates to the EMA's loss;
    - that checkpoint, loaded with --plugins ema, holds no EMA: the EMA starts from the
      loaded weights (and matches the oracle from there).
    The saving run's TensorBoard scalars keep the EMA's validation loss apart from the raw
    one, and log the EMA wait."""
    from tests.helpers.training_runs import final_validation_loss, pretrain, run

    ckpt, out, board = tmp_path / "ckpt", tmp_path / "exported", tmp_path / "board.tsv"
    vocab = ["--make-vocab-size-divisible-by", "256"]  # the same padded vocabulary at TP=1
    ema = ["--ema-decay", "0.8", "--ema-interval", "2", "--ema-start-iter", "3"]
    at_tp2 = ["--tensor-model-parallel-size", "2", "--oracle-tensorboard", str(board)]
    saved, loaded = _save_then_load(tmp_path, ema + vocab, at_tp2)
    _same_ema_loss(saved, loaded, 1e-5)  # fp32 on CPU; TP changes only the summation order

    # TensorBoard: Megatron's tags for the raw weights, the same with " (EMA weights)". The
    # validation set's value comes first; Megatron writes the test set's under the same tag.
    scalars = _tensorboard(board)
    raw = scalars["lm loss validation"][5][0]
    ema_loss = scalars["lm loss validation (EMA weights)"][5][0]
    assert raw == pytest.approx(final_validation_loss(saved), rel=1e-6)  # printed: 7 digits
    assert ema_loss == pytest.approx(_final_ema_validation_loss(saved), rel=1e-6)
    assert abs(raw - ema_loss) > 1e-4
    assert "lm loss validation vs samples (EMA weights)" in scalars
    assert sorted(scalars["ema-wait-ms"]) == [1, 2, 3, 4, 5]  # every --log-interval
    assert all(len(ms) == 1 and ms[0] >= 0.0 for ms in scalars["ema-wait-ms"].values())

    # ema-export: the EMA, exactly, as the weights; nothing else of the training state.
    # (`megaseek ema-export` with this file's registry, which knows the oracle plugin.)
    exported = run([sys.executable, str(Path(__file__).resolve()), "ema-export", "--load",
                    str(ckpt), "--save", str(out)], tmp_path, _REPO_FIRST_ON_PATH)
    assert "the EMA weights of iteration 5 are saved" in exported
    source, written = _checkpoint(ckpt, 5), _checkpoint(out, 5)
    weights = {k for k in source if not k.startswith(("optimizer.", "megaseek:"))}
    assert set(written) == weights
    assert all(torch.equal(written[k], source["megaseek:ema." + k]) for k in weights)

    plain = pretrain(["--train-iters", "5", "--load", str(out), "--no-load-optim",
                      "--no-load-rng", *vocab], tmp_path, ranks=1)
    assert "(EMA weights)" not in plain
    assert final_validation_loss(plain) == pytest.approx(_final_ema_validation_loss(saved),
                                                         abs=1e-5)  # TP=2 vs 1: summation order

    trace = tmp_path / "restart.txt"
    restarted = _train(["--plugins", "ema", "ema_oracle", "--ema-decay", "0.9", "--train-iters",
                        "7", "--load", str(out), "--no-load-optim", "--no-load-rng", *vocab,
                        "--oracle-trace", str(trace)], tmp_path, ranks=1)
    assert "the checkpoint holds no EMA; it starts from the loaded weights" in restarted
    assert "EMA weights" not in restarted  # without --ema-eval only the raw weights evaluate
    _assert_oracle(trace, 1)


# 1F1B (Megatron's), DualPipeV (a V of 4 stages), DualPipe (each stage on both ranks, the
# second copy marked as a replica when saved): each schedule's checkpoint exports.
@pytest.mark.slow
@pytest.mark.parametrize("schedule", [[], ["--plugins", "dualpipe", "--pipeline-schedule",
                                           "dualpipev"],
                                      ["--plugins", "dualpipe", "--pipeline-schedule", "dualpipe"]],
                         ids=["1f1b", "dualpipev", "dualpipe"])
def test_ema_export_of_every_pipeline_schedule(schedule, tmp_path):
    """A checkpoint saved at PP=2 under each schedule exports (`megaseek ema-export`
    starting its 2 ranks itself) to the EMA weights, exactly; --overwrite replaces the
    folder that was there."""
    from tests.helpers.training_runs import run

    ckpt, out = tmp_path / "ckpt", tmp_path / "exported"
    _train(_with_plugins(schedule, "ema") + [
        "--num-layers", "4", "--pipeline-model-parallel-size", "2",
        "--untie-embeddings-and-output-weights", "--hidden-dropout", "0",
        "--attention-dropout", "0", "--ema-decay", "0.5", "--train-iters", "3",
        "--save", str(ckpt), "--save-interval", "3"], tmp_path)
    out.mkdir()
    (out / "stale").write_text("an earlier export")
    exported = run([sys.executable, str(Path(__file__).resolve()), "ema-export", "--load",
                    str(ckpt), "--save", str(out), "--overwrite"], tmp_path, _REPO_FIRST_ON_PATH)
    assert "the EMA weights of iteration 3 are saved" in exported
    assert not (out / "stale").exists()
    source, written = _checkpoint(ckpt, 3), _checkpoint(out, 3)
    weights = {k for k in source if not k.startswith(("optimizer.", "megaseek:"))}
    assert set(written) == weights
    assert all(torch.equal(written[k], source["megaseek:ema." + k]) for k in weights)
    assert any(not torch.equal(source[k], source["megaseek:ema." + k]) for k in weights)


def _refusal(argv: list[str], capsys) -> str:
    from integration.cli import main

    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    return capsys.readouterr().err


def test_ema_export_never_writes_over_its_input(tmp_path, capsys):
    """`--save` that is `--load` (also through a symbolic link), lies inside it or holds it
    would lose the training checkpoint: refused before anything is read, exit 2, one line
    naming --save; an existing --save needs --overwrite (which cannot lift the first)."""
    ckpt, other = tmp_path / "ckpt", tmp_path / "other"
    ckpt.mkdir()
    other.mkdir()
    (tmp_path / "link").symlink_to(ckpt)
    for save, why in ((ckpt, "is the input"), (tmp_path / "link", "is the input"),
                      (ckpt / "ema", "is inside the input"), (tmp_path, "contains the input")):
        for extra in ([], ["--overwrite"]):
            err = _refusal(["ema-export", "--load", str(ckpt), "--save", str(save), *extra],
                           capsys)
            assert err.startswith(f"megaseek: error: ema-export --save {save}: {why} {ckpt}; ")
            assert err.count("\n") == 1
    err = _refusal(["ema-export", "--load", str(ckpt), "--save", str(other)], capsys)
    assert err == (f"megaseek: error: ema-export --save {other} exists; pass --overwrite to "
                   "replace it\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "link", "other"]


def test_ema_export_overwrite_never_replaces_a_file(tmp_path, capsys):
    """--overwrite replaces a previous export (a folder): a --save that is a file is
    refused, naming --save, and the file is left as it was."""
    ckpt, afile = tmp_path / "ckpt", tmp_path / "afile"
    ckpt.mkdir()
    afile.write_text("keep me")
    for extra in ([], ["--overwrite"]):
        err = _refusal(["ema-export", "--load", str(ckpt), "--save", str(afile), *extra], capsys)
        assert err == (f"megaseek: error: ema-export --save {afile} is not a folder; "
                       "--overwrite replaces a previous output (a folder), never a file: "
                       "write to another path\n")
    assert afile.read_text() == "keep me"


def test_ema_export_of_a_step_not_saved_names_ckpt_step_and_the_saved_ones(tmp_path, capsys):
    """--ckpt-step N where the folder holds no iteration N: the refusal names --ckpt-step
    and lists the iterations it has (before anything is read)."""
    ckpt = tmp_path / "ckpt"
    for iteration in (2, 10):
        (ckpt / f"iter_{iteration:07d}").mkdir(parents=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("10")
    err = _refusal(["ema-export", "--load", str(ckpt), "--save", str(tmp_path / "out"),
                    "--ckpt-step", "1"], capsys)
    assert err == (f"megaseek: error: --ckpt-step 1: no checkpoint of iteration 1 in {ckpt} "
                   "(it has 2, 10)\n")


def test_megaseek_has_the_ema_export_command(capsys):
    from integration.cli import main

    with pytest.raises(SystemExit) as done:
        main(["ema-export", "--help"])
    assert done.value.code == 0
    assert "usage: megaseek ema-export [-h] --load CKPT --save OUT" in capsys.readouterr().out


def test_ema_export_refuses_a_checkpoint_without_ema(tmp_path):
    from integration import ema_export
    from plugins import PluginError

    options = ema_export.parse(["--load", "CKPT", "--save", "OUT"])
    with pytest.raises(PluginError, match=r"^ema-export needs a checkpoint saved by training "
                       r"with --plugins ema; CKPT holds no EMA \(no megaseek:ema\.\* weights\)$"):
        ema_export.check_checkpoint(options, {"embedding.word_embeddings.weight"})


def test_ema_export_runs_the_saved_arguments_without_the_ema_plugin_and_its_flags():
    import argparse

    from integration import ema_export

    saved = argparse.Namespace(plugins=["mla", "ema"], ema_decay=0.9, ema_interval=2,
                               ema_start_iter=1, ema_eval=True, hidden_size=64)
    options = ema_export.parse(["--load", "CKPT", "--save", "OUT"])
    args = ema_export.run_arguments(saved, options)
    assert args.plugins == ["mla"] and args.hidden_size == 64
    assert not [dest for dest in vars(args) if dest.startswith("ema_")]
    assert saved.ema_decay == 0.9  # the saved arguments are left as read
    ema_export.check_checkpoint(options, {"megaseek:ema.embedding.word_embeddings.weight"})


@pytest.mark.slow
def test_worker_failure_in_the_last_update_fails_the_run(tmp_path):
    """The last update has no next step to report it: the end of training waits for it."""
    with pytest.raises(AssertionError) as failed:
        _train(["--plugins", "ema", "ema_oracle", "--ema-decay", "0.9", "--train-iters", "3",
                "--oracle-fail-last-update"], tmp_path, ranks=1)
    assert re.search(r"(?s)on_training_end.*EMAWorkerFailed: the background EMA update failed"
                     r".*ValueError: disk on fire", str(failed.value))


# --- the EMA object on its own -------------------------------------------------------------

def _single_rank_ema(decay=0.9, interval=1, start=0):
    from plugins.ema.ema import EMAConfig, HostEMA, owned_shards

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    return model, HostEMA(owned_shards([model]), EMAConfig(decay, interval, start))


def test_worker_failure_surfaces_at_the_next_step():
    from plugins.ema import EMAWorkerFailed

    model, ema = _single_rank_ema()

    def broken(*unused):
        raise ValueError("disk on fire")

    ema.apply = broken
    ema.step(1)
    with pytest.raises(EMAWorkerFailed, match=r"(?s)Traceback.*ValueError: disk on fire"):
        ema.step(2)
    ema.close()  # the failure was reported once; nothing is left running
    assert ema._thread is None


def test_swap_puts_the_ema_in_and_restores_the_weights_bit_for_bit():
    model, ema = _single_rank_ema(decay=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.step(1)  # ema = (w + w + 1) / 2
    trained = [p.detach().clone() for p in model.parameters()]
    with ema.swapped_in():
        for p, w in zip(model.parameters(), before):
            torch.testing.assert_close(p, w + 0.5, rtol=0, atol=1e-6)  # fp32 rounding of 0.5
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), trained))
    ema.close()


def test_no_thread_outlives_its_update():
    import threading

    model, ema = _single_rank_ema()
    for i in range(1, 4):
        ema.step(i)
    ema.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("megaseek-ema")]


@pytest.mark.gpu
def test_gpu_snapshot_on_a_side_stream_into_pinned_memory():
    from plugins.ema.ema import EMAConfig, HostEMA, owned_shards

    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = HostEMA(owned_shards([model]), EMAConfig(0.9))
    optimizer.register_step_pre_hook(lambda *unused: ema.hold_weight_writes())
    assert ema.ema.is_pinned() and ema.copies_from_gpu
    oracle = torch.cat([p.detach().float().cpu().reshape(-1) for p in model.parameters()])
    for iteration in range(1, 6):
        model(torch.randn(8, 256, device="cuda")).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.step(iteration)
        w = torch.cat([p.detach().float().cpu().reshape(-1) for p in model.parameters()])
        oracle.mul_(0.9).add_(w, alpha=0.1)
    ema.close()
    assert torch.equal(ema.ema, oracle)


if __name__ == "__main__":
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    _main(sys.argv[1:])
