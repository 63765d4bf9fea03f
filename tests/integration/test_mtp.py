"""Multi-token prediction (Megatron-Core's MTP block, with megaseek's MLA layers inside)
against the DeepSeek-V3 report's formula (section 2.2), written here from the paper:

    h^k_i = TRM_k( M_k [ RMSNorm(Emb(t_{i+k})) ; RMSNorm(h^{k-1}_i) ] )       (i + k < T)
    L^k   = mean over those i of CE( OutHead(h^k_i), t_{i+1+k} )
    L     = L_main + (lambda / D) * sum_k L^k

with h^0 the main model's output, Emb and OutHead the main model's (shared) embedding and
output head, and the halves of M_k's input in the order the published checkpoints lay
out `eh_proj` (embedding first). The reference truncates each depth's sequence to the
positions that have a target; Megatron keeps the full length, rolls tokens, labels and
the loss mask, and masks the rolled-in tail (causal attention keeps the tail from
reaching earlier positions). One process, fp32: the two agree to rounding.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from plugins import PluginError
from tests.helpers import paths
from tests.helpers.mla_oracle import MLAShape
from tests.helpers.multirank import run_ranks
from tests.helpers.training_runs import losses, mtp_losses, torchrun

SHAPE = MLAShape(hidden=32, heads=2, q_lora_rank=24, kv_lora_rank=16, qk_head_dim=8,
                 qk_pos_emb_head_dim=4, v_head_dim=8)
VOCAB, SEQ, BATCH, DEPTH, WEIGHT = 48, 12, 2, 2, 0.3


def _model():
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_mtp_block_spec,
    )

    from plugins.mla.spec import with_mla
    from tests.helpers.mla_build import mla_config

    config = mla_config(SHAPE, num_layers=2, mtp_num_layers=DEPTH,
                        mtp_loss_scaling_factor=WEIGHT)
    local = get_gpt_layer_local_spec(normalization="RMSNorm")
    mtp = get_gpt_mtp_block_spec(config, local, use_transformer_engine=False)
    for mtp_layer in mtp.layer_specs:  # the MLA plugin's layer inside each MTP layer
        mtp_layer.submodules.mtp_model_layer = with_mla(mtp_layer.submodules.mtp_model_layer)
    return GPTModel(config=config, transformer_layer_spec=with_mla(local), vocab_size=VOCAB,
                    max_sequence_length=SEQ, position_embedding_type="rope",
                    share_embeddings_and_output_weights=False, mtp_block_spec=mtp)


def _formula(model, tokens, positions, labels, mask):
    """L_main and [L^1 .. L^D] from the formula above, through the model's own modules."""
    ce = torch.nn.functional.cross_entropy
    decoder_input, rotary = model._preprocess(input_ids=tokens, position_ids=positions)[:2]
    hidden = model.decoder(hidden_states=decoder_input, attention_mask=None,
                           rotary_pos_emb=rotary)                            # [s, b, h]

    def mean_ce(h, targets, weights):                                       # h: [s', b, h]
        logits = model.output_layer(h)[0].transpose(0, 1).float()           # [b, s', V]
        per_token = ce(logits.reshape(-1, VOCAB), targets.reshape(-1), reduction="none")
        return (per_token * weights.reshape(-1)).sum() / weights.sum()

    main = mean_ce(hidden, labels, mask)
    depths = []
    for k, layer in enumerate(model.mtp.layers, start=1):
        kept = SEQ - k                                      # positions i with i + k < T
        embedded = model.embedding(input_ids=tokens[:, k:], position_ids=positions[:, k:])
        joined = torch.cat([layer.enorm(embedded), layer.hnorm(hidden[:kept])], dim=-1)
        hidden = layer.eh_proj(joined)[0]                                   # [s-k, b, h]
        hidden = layer.mtp_model_layer(hidden_states=hidden, attention_mask=None,
                                       rotary_pos_emb=rotary)[0]
        hidden = layer.final_layernorm(hidden)
        depths.append(mean_ce(hidden, labels[:, k:], mask[:, k:]))          # t_{i+1+k}
    return main, depths


def _gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _mtp_against_formula(rank, world_size):
    from megatron.core.transformer.multi_token_prediction import (
        MTPLossAutoScaler,
        MTPLossLoggingHelper,
    )

    from tests.helpers.mla_build import megatron_ranks

    with megatron_ranks(seed=7):
        model = _model()
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
        labels = torch.roll(tokens, -1, dims=1)
        labels[:, -1] = torch.randint(0, VOCAB, (BATCH,), generator=generator)
        positions = torch.arange(SEQ).expand(BATCH, SEQ)
        mask = torch.ones(BATCH, SEQ)
        mask[0, 3] = mask[1, 7] = 0.0  # masked positions move with the targets at each depth

        def megatron_step(mtp_scale: float):
            model.zero_grad(set_to_none=True)
            MTPLossLoggingHelper.clean_metrics_in_tracker()
            MTPLossAutoScaler.set_loss_scale(torch.tensor(mtp_scale))
            losses = model(tokens, positions, None, labels=labels, loss_mask=mask)   # [b, s]
            ((losses * mask).sum() / mask.sum()).backward()
            return _gradients(model), MTPLossLoggingHelper.tracker["loss_values"].clone()

        try:
            with_mtp, logged = megatron_step(1.0)
            without_mtp, _ = megatron_step(0.0)
        finally:
            MTPLossAutoScaler.set_loss_scale(torch.tensor(1.0))

        model.zero_grad(set_to_none=True)
        main, depths = _formula(model, tokens, positions, labels, mask)
        (WEIGHT / DEPTH * sum(depths)).backward()
        mtp_only = _gradients(model)
        model.zero_grad(set_to_none=True)
        main, depths = _formula(model, tokens, positions, labels, mask)
        (main + WEIGHT / DEPTH * sum(depths)).backward()
        total = _gradients(model)
        return {"logged": logged, "depths": torch.stack(depths).detach(), "with_mtp": with_mtp,
                "without_mtp": without_mtp, "formula_total": total, "formula_mtp": mtp_only}


def test_mtp_loss_and_gradients_follow_the_reports_formula():
    found = run_ranks(_mtp_against_formula, 1)[0]
    # Megatron logs each depth's mean loss; the formula gives the same numbers.
    torch.testing.assert_close(found["logged"], found["depths"], rtol=1e-5, atol=1e-6)
    assert found["depths"].min() > 3.0  # untrained: about log(48); not a vacuous zero

    # The whole objective's gradients, every parameter, MTP modules and embedding included
    # (fp32, same modules, reordered sums: rounding only).
    assert found["with_mtp"].keys() == found["formula_total"].keys()
    for name, expected in found["formula_total"].items():
        torch.testing.assert_close(found["with_mtp"][name], expected, rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")

    # MTP's own share reaches the shared embedding: Megatron's gradient with MTP minus
    # without it is the formula's gradient of (lambda / D) sum L^k, and it is not zero.
    embedding = "embedding.word_embeddings.weight"
    mtp_share = found["with_mtp"][embedding] - found["without_mtp"][embedding]
    assert found["formula_mtp"][embedding].abs().sum() > 0
    torch.testing.assert_close(mtp_share, found["formula_mtp"][embedding], rtol=1e-4, atol=1e-6)
    # ... and the output head, which the main loss reaches too; the MTP layers get only MTP's.
    assert not any(found["without_mtp"].get(name, torch.zeros(1)).abs().sum() > 0
                   for name in found["with_mtp"] if name.startswith("mtp."))


# --- MTP through Megatron's loop: under 1F1B at PP=2, DualPipeV and DualPipe against one
# process, dense and MLA + MoE with EP=2, is tests/plugins/dualpipe/test_pipeline.py (every
# run there has an MTP layer and compares its loss).

PIPELINE = ["--num-layers", "4", "--pipeline-model-parallel-size", "2",
            "--untie-embeddings-and-output-weights"]
MLA_MTP = ["--plugins", "mla", "--multi-latent-attention", "--q-lora-rank", "32",
           "--kv-lora-rank", "16", "--qk-head-dim", "16", "--qk-pos-emb-head-dim", "8",
           "--v-head-dim", "16", "--rope-type", "rope", "--normalization", "RMSNorm",
           "--swiglu", "--disable-bias-linear", "--position-embedding-type", "rope",
           "--mtp-num-layers", "1"]



# --- the DeepSeek-V3 spec through Megatron's --spec -----------------------------------------

RELEASE = str(paths.RELEASE_SCRIPT)


def test_release_script_trains_the_tiny_presets_deepseek_v3_model(tmp_path):
    """Megatron-LM's release pretrain_gpt.py (no model provider: Megatron's GPT builder reads
    --spec and builds MTP from its own decoder specs) trains the `tiny` preset through the
    launcher: the DeepSeek-V3 spec (`--spec integration.deepseek_v3 decoder_spec`, from the
    preset), MLA, MoE with EP=2 and FP8 dispatch, FP8 linears, one MTP layer."""
    output = torchrun(["-m", "integration.launch", RELEASE], [
        "--preset", "tiny", "--mock-data", "--tokenizer-type", "NullTokenizer",
        "--vocab-size", "128", "--expert-model-parallel-size", "2", "--fp8-backend",
        "emulated", "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "3e-3",
        "--lr-warmup-iters", "1", "--train-iters", "6", "--log-interval", "1",
        "--eval-interval", "6", "--eval-iters", "1", "--seed", "1234"], tmp_path)
    assert "megaseek: --preset tiny:" in output and "integration.deepseek_v3 decoder_spec" in output
    trained, mtp = losses(output), mtp_losses(output)
    assert sorted(mtp) == sorted(trained) == [1, 2, 3, 4, 5, 6]
    assert trained[6] < trained[1] - 0.1 and mtp[6] < mtp[1] - 0.1


def test_deepseek_v3_spec_names_what_the_architecture_needs():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from integration.deepseek_v3 import decoder_spec

    dense = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=2,
                              normalization="RMSNorm")
    with pytest.raises(PluginError, match=r"needs --multi-latent-attention, --num-experts, "
                                          r"--moe-shared-expert-intermediate-size, --swiglu"):
        decoder_spec(dense)


# --- the MTP stage's embedding copy where one rank holds both ends (DualPipeV) ---------------

def _dualpipev_chunks_with_mtp(rank, world_size):
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_mtp_block_spec,
    )

    import integration  # noqa: F401
    from plugins.dualpipe.placement import DualPipePlacement, sum_embedding_copies
    from plugins.dualpipe.program import Pipeline
    from plugins.mla.spec import with_mla
    from tests.helpers.mla_build import mla_config
    from tests.helpers.patching import patching
    from upstream import cpu
    from upstream.seams.placement import pipeline_placement

    pipeline = Pipeline("dualpipev", 2, 4)
    placement = DualPipePlacement(2, 2, lambda r, c: pipeline.place(r, c)[1])
    cpu_fixes = cpu.install(force=True)
    with patching() as patcher:
        pipeline_placement(placement).apply(patcher)
        try:
            parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2,
                                                     virtual_pipeline_model_parallel_size=2)
            tensor_parallel.model_parallel_cuda_manual_seed(1234 + rank)
            config = mla_config(SHAPE, num_layers=4, mtp_num_layers=1,
                                pipeline_model_parallel_size=2,
                                virtual_pipeline_model_parallel_size=2,
                                pipeline_dtype=torch.float32)
            local = get_gpt_layer_local_spec(normalization="RMSNorm")
            chunks = []
            for chunk in range(2):
                mtp = get_gpt_mtp_block_spec(config, local, use_transformer_engine=False,
                                             vp_stage=chunk)
                for mtp_layer in (mtp.layer_specs if mtp is not None else []):
                    submodules = mtp_layer.submodules
                    submodules.mtp_model_layer = with_mla(submodules.mtp_model_layer)
                chunks.append(GPTModel(config=config, transformer_layer_spec=with_mla(local),
                                       vocab_size=VOCAB, max_sequence_length=SEQ,
                                       position_embedding_type="rope", vp_stage=chunk,
                                       share_embeddings_and_output_weights=False,
                                       mtp_block_spec=mtp))
            group = parallel_state.get_embedding_group(check_initialized=False)
            found = {"embedding_group": group
                     and torch.distributed.get_process_group_ranks(group),
                     "roles": [(c.pre_process, c.post_process, c.mtp_process) for c in chunks]}
            if rank == 0:  # stage 0 in chunk 0; the last stage, with MTP, in chunk 1
                first, last = (c.embedding.word_embeddings.weight for c in chunks)
                found["copies_equal"] = torch.equal(first, last) and first.abs().sum() > 0
                for weight, value in ((first, 1.0), (last, 2.0)):
                    weight.main_grad = torch.full_like(weight, value)
                sum_embedding_copies(chunks)
                found["summed"] = (first.main_grad.unique().tolist(),
                                   last.main_grad.unique().tolist())
            return found
        finally:
            parallel_state.destroy_model_parallel()
            if cpu_fixes is not None:
                cpu_fixes.undo()


def test_dualpipev_rank_0_ties_the_mtp_embedding_copy_to_the_real_one():
    """Megatron zeroes the MTP stage's embedding copy and fills it by an all-reduce over the
    embedding group of ranks, which cannot reach a copy on the same rank. Under the
    placement the group is the first pipeline rank alone, the copy starts equal to stage
    0's embedding (not zero), and after backward both take the sum of their gradients."""
    rank0, rank1 = run_ranks(_dualpipev_chunks_with_mtp, 2)
    assert rank0["roles"] == [(True, False, False), (False, True, True)]
    assert rank1["roles"] == [(False, False, False), (False, False, False)]
    assert rank0["embedding_group"] == [0] and rank1["embedding_group"] is None
    assert rank0["copies_equal"]
    assert rank0["summed"] == ([3.0], [3.0])


def test_a_layout_that_places_no_mtp_layer_is_refused_at_start_up(monkeypatch):
    """Megatron builds only the layout's 'm' entries: a layout without them would drop
    --mtp-num-layers silently. The launch path's start-up check (run before Megatron's
    argument dump) stops it, naming both flags; a layout with the 'm' passes."""
    from integration import hooks
    from tests.helpers.plugin_args import validated

    monkeypatch.setenv("WORLD_SIZE", "2")
    layout = ["--pipeline-model-parallel-layout"]
    base = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", "64", "--max-position-embeddings", "64", "--micro-batch-size", "1",
            "--global-batch-size", "8", "--train-iters", "1", "--lr", "1e-3", "--mock-data",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--transformer-impl",
            "local", "--no-rope-fusion", "--distributed-backend", "gloo", *PIPELINE,
            *MLA_MTP]
    args, _ = validated(base + layout + ["Ett|ttL"])
    with pytest.raises(PluginError, match=r"--mtp-num-layers 1 with "
                                          r"--pipeline-model-parallel-layout .*places 0 MTP layer"):
        hooks._start_up_checks(args)
    args, _ = validated(base + layout + ["Ett|ttmL"])
    hooks._start_up_checks(args)


# --- both launch paths, every schedule: the same model, MTP's validation loss -----------------

TINY_RUN = ["--preset", "tiny", "--mock-data", "--tokenizer-type", "NullTokenizer",
            "--vocab-size", "128", "--fp8-backend", "emulated", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--lr", "3e-3", "--lr-warmup-iters", "1",
            "--train-iters", "2", "--log-interval", "1", "--eval-interval", "2",
            "--eval-iters", "1", "--seed", "1234", "--save-interval", "2"]
SCHEDULES = {
    "1f1b": ["--pipeline-model-parallel-size", "2"],
    "dualpipev": ["--pipeline-model-parallel-size", "2", "--plugins", "mla", "moe", "fp8",
                  "dualpipe", "--pipeline-schedule", "dualpipev"],
    "dualpipe": ["--pipeline-model-parallel-size", "2", "--plugins", "mla", "moe", "fp8",
                 "dualpipe", "--pipeline-schedule", "dualpipe"],
}
# Each schedule's uneven cut of the preset's 4 layers and MTP, as Megatron's layout flag
# says it: Megatron's own under 1F1B (2 stages), the placement's under DualPipeV (4 stages,
# the last holding MTP and the loss only) and DualPipe (2 stages). One step, saved, no
# evaluation: the suite's time.
LAYOUTS = {"1f1b": "Ettt|tmL", "dualpipev": "Et|tt|t|mL", "dualpipe": "Ettt|tmL"}
ONE_STEP = ["--train-iters", "1", "--lr-warmup-iters", "0", "--eval-iters", "0",
            "--save-interval", "1"]
_VALIDATION_MTP = re.compile(r"validation loss at iteration \d+(?: on validation set)? \| lm loss "
                             r"value: ([0-9.E+-]+) \|.*?\| mtp_1 loss value: ([0-9.E+-]+) \|")


def _validations(output: str) -> list[tuple[float, float]]:
    """Each validation's (main loss, MTP loss), as Megatron's validation lines print them."""
    found = _VALIDATION_MTP.findall(output)
    assert found, "no MTP loss on the validation line"
    return [(float(main), float(mtp)) for main, mtp in found]


def _parameters(checkpoint: Path, iteration: int = 2) -> dict[str, tuple[int, ...]]:
    """The model's tensors a `torch_dist` checkpoint holds (names and global shapes: the
    placement does not show in them)."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(checkpoint / f"iter_{iteration:07d}")).read_metadata()
    return {name: tuple(entry.size) for name, entry in metadata.state_dict_metadata.items()
            if hasattr(entry, "size") and not name.startswith("optimizer.")}


@pytest.mark.slow
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_both_launch_paths_build_and_train_one_model_and_report_mtp_validation_loss(
        schedule, tmp_path):
    """The tiny preset (MLA + MoE + FP8 + one MTP layer) at PP=2 under `schedule`, through
    `megaseek pretrain` and through the launcher running Megatron-LM's release
    pretrain_gpt.py (Megatron's own GPT builder makes the MTP block spec: the plugins' spec
    transforms reach it whatever the placement; under DualPipe(V) rank 0 holds the MTP
    stage), each with the even split and with the schedule's layout (LAYOUTS): all train,
    and save the same parameters (every layer under its global number, wherever it ran).
    The validation line carries MTP's loss beside the main loss, equal to what one process
    without a pipeline computes on the same batches from the saved weights (under
    DualPipe(V) the MTP layer sits on rank 0 and its loss is gathered to the last rank,
    which prints)."""
    runs, saved = {}, {}
    for path, command in (("pretrain", ["-m", "integration.pretrain"]),
                          ("release", ["-m", "integration.launch", RELEASE])):
        runs[path] = torchrun(command, TINY_RUN + SCHEDULES[schedule] + [
            "--save", str(tmp_path / path)], tmp_path)
        assert sorted(losses(runs[path])) == sorted(mtp_losses(runs[path])) == [1, 2], path
        saved[(path, "even")] = _parameters(tmp_path / path)
        laid_out = torchrun(command, TINY_RUN + SCHEDULES[schedule] + ONE_STEP + [
            "--pipeline-model-parallel-layout", LAYOUTS[schedule], "--save",
            str(tmp_path / f"{path}-layout")], tmp_path)
        assert sorted(losses(laid_out)) == sorted(mtp_losses(laid_out)) == [1], path
        saved[(path, "layout")] = _parameters(tmp_path / f"{path}-layout", iteration=1)
    reference = saved[("pretrain", "even")]
    assert [run for run, parameters in saved.items() if parameters != reference] == []
    assert any(name.startswith("mtp.layers.0.") for name in reference)

    # The checkpoint of iteration 2 evaluates, without training, the batches that the
    # evaluation at iteration 2 (each run's first) read.
    one_process = torchrun(["-m", "integration.pretrain"], TINY_RUN + [
        "--pipeline-model-parallel-size", "1", "--load", str(tmp_path / "release"),
        "--skip-train"], tmp_path, ranks=1)
    [(main, mtp)] = _validations(one_process)
    assert mtp != pytest.approx(main, rel=1e-3)  # two losses, not one printed twice
    for path, output in runs.items():
        assert _validations(output)[0] == (pytest.approx(main, rel=1e-5),
                                           pytest.approx(mtp, rel=1e-5)), path
