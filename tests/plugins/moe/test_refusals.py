"""Every MoE flag of Megatron 0.19.2 with `--plugins moe`: refused at start-up by name (with
the reason), or honoured by the plugin's layer. Nothing is ignored quietly.

The refusals go through argument parsing and the plugins' validation on one process, as
the launch path does; the honoured flags are checked on the layer Megatron's config builds.
"""

from __future__ import annotations

import argparse
import re

import pytest
import torch

import integration  # noqa: F401
from plugins import PluginError
from tests.helpers.moe_build import EXPERTS, FFN, HIDDEN, moe_layer, tokens
from tests.helpers.multirank import run_ranks
from tests.plugins.moe.test_plugin import BASE, MOE, enabled

# (flags added to a valid MoE command line, the flag the error must name, a word of the
# reason where it matters to the user)
REFUSALS = [
    # the plugin's dispatcher is its own
    (["--moe-token-dispatcher-type", "alltoall"], "--moe-token-dispatcher-type", "all-to-all"),
    (["--moe-token-dispatcher-type", "flex"], "--moe-token-dispatcher-type", "all-to-all"),
    (["--moe-enable-deepep"], "--moe-enable-deepep", "dispatch"),
    (["--moe-flex-dispatcher-backend", "hybridep"], "--moe-flex-dispatcher-backend", ""),
    (["--moe-flex-dispatcher-num-sms", "20"], "--moe-flex-dispatcher-num-sms", ""),
    (["--moe-deepep-num-sms", "20"], "--moe-deepep-num-sms", ""),
    (["--moe-hybridep-num-sms", "20"], "--moe-hybridep-num-sms", ""),
    (["--moe-hybridep-num-blocks-permute", "4"], "--moe-hybridep-num-blocks-permute", ""),
    (["--moe-hybridep-num-blocks-unpermute", "4"], "--moe-hybridep-num-blocks-unpermute", ""),
    (["--moe-hybridep-num-sms-preprocessing", "32"], "--moe-hybridep-num-sms-preprocessing",
     ""),
    (["--moe-hybridep-pad-uneven-dispatch-inputs"],
     "--moe-hybridep-pad-uneven-dispatch-inputs", ""),
    (["--moe-permute-fusion-into-hybridep"], "--moe-permute-fusion-into-hybridep", ""),
    (["--moe-ncclep-static-shape"], "--moe-ncclep-static-shape", ""),
    (["--moe-ncclep-zero-copy"], "--moe-ncclep-zero-copy", ""),
    (["--moe-permute-fusion"], "--moe-permute-fusion", "fused"),
    (["--overlap-moe-expert-parallel-comm"], "--overlap-moe-expert-parallel-comm", ""),
    (["--overlap-dispatch-backward-with-experts-wgrad"],
     "--overlap-dispatch-backward-with-experts-wgrad", ""),
    (["--moe-shared-expert-overlap"], "--moe-shared-expert-overlap", "after the combine"),
    # DeepSeek-V3 drops no tokens
    (["--moe-expert-capacity-factor", "1.25"], "--moe-expert-capacity-factor", "drops no tokens"),
    (["--moe-expert-capacity-factor", "-1"], "--moe-expert-capacity-factor", "drops no tokens"),
    (["--moe-expert-rank-capacity-factor", "2"], "--moe-expert-rank-capacity-factor",
     "drops no tokens"),
    (["--moe-pad-expert-input-to-capacity"], "--moe-pad-expert-input-to-capacity",
     "drops no tokens"),
    (["--moe-token-drop-policy", "position"], "--moe-token-drop-policy", "drops no tokens"),
    (["--moe-pad-experts-for-cuda-graph-inference"],
     "--moe-pad-experts-for-cuda-graph-inference", "drops no tokens"),
    # the router is DeepSeek-V3's gate
    (["--moe-router-pre-softmax"], "--moe-router-pre-softmax", "softmax"),
    (["--moe-input-jitter-eps", "0.01"], "--moe-input-jitter-eps", "gate"),
    (["--moe-router-force-load-balancing"], "--moe-router-force-load-balancing", "gate"),
    (["--moe-router-force-biased", "0.1"], "--moe-router-force-biased", "gate"),
    (["--moe-router-quantile-balancing-ema", "0.9"], "--moe-router-quantile-balancing-ema",
     "quantile_balancing"),
    (["--moe-enable-routing-replay"], "--moe-enable-routing-replay", "replayed"),
    (["--moe-router-fusion"], "--moe-router-fusion", "gate"),
    (["--moe-router-padding-for-quantization"], "--moe-router-padding-for-quantization",
     "nothing to pad"),
    (["--moe-router-padding-for-fp8"], "--moe-router-padding-for-fp8", "nothing to pad"),
    (["--moe-routing-trace-path", "/tmp/trace"], "--moe-routing-trace-path", "tracer"),
    (["--moe-routing-trace-max-training-iters", "5"], "--moe-routing-trace-max-training-iters",
     "tracer"),
    (["--moe-routing-trace-capture-logits"], "--moe-routing-trace-capture-logits", "tracer"),
    (["--moe-routing-trace-capture-hidden-states"], "--moe-routing-trace-capture-hidden-states",
     "tracer"),
    (["--moe-routing-trace-dump-weights"], "--moe-routing-trace-dump-weights", "tracer"),
    (["--moe-router-score-function", "sqrtsoftplus"], "--moe-router-score-function", "sigmoid"),
    (["--moe-router-dtype", "fp64"], "--moe-router-dtype", "fp32"),
    (["--moe-router-bias-update-rate=-1e-3"], "--moe-router-bias-update-rate", "away from"),
    (["--moe-router-topk", "0"], "--moe-router-topk", ""),
    (["--moe-router-topk", "9"], "--moe-router-topk", ""),
    (["--moe-router-topk-scaling-factor", "0"], "--moe-router-topk-scaling-factor", ""),
    (["--moe-router-num-groups", "0"], "--moe-router-num-groups", ""),
    (["--moe-router-group-topk", "0"], "--moe-router-group-topk", ""),
    # balance losses: none, or DeepSeek-V3's sequence-wise one; z-loss coefficient
    (["--moe-router-load-balancing-type", "global_aux_loss"], "--moe-router-load-balancing-type",
     ""),
    (["--moe-router-load-balancing-type", "sinkhorn"], "--moe-router-load-balancing-type", ""),
    (["--moe-router-load-balancing-type", "quantile_balancing"],
     "--moe-router-load-balancing-type", ""),
    (["--moe-router-load-balancing-type", "seq_aux_loss", "none", "--moe-aux-loss-coeff",
      "1e-4", "0"], "--moe-router-load-balancing-type", "one value"),
    (["--moe-aux-loss-coeff", "1e-2"], "--moe-aux-loss-coeff", "no loss to weigh"),
    (["--moe-router-load-balancing-type", "seq_aux_loss", "--moe-aux-loss-coeff=-1e-4"],
     "--moe-aux-loss-coeff", ">= 0"),
    (["--moe-z-loss-coeff=-1e-3"], "--moe-z-loss-coeff", "> 0"),
    (["--moe-z-loss-coeff", "0"], "--moe-z-loss-coeff", "> 0"),
    # sizes and layout of the experts
    (["--moe-ffn-hidden-size", "0"], "--moe-ffn-hidden-size", "> 0"),
    (["--moe-shared-expert-intermediate-size", "0"], "--moe-shared-expert-intermediate-size",
     "> 0"),
    (["--moe-dispatch-ranks-per-node", "-1"], "--moe-dispatch-ranks-per-node", "positive"),
    (["--moe-dispatch-ranks-per-node", "0"], "--moe-dispatch-ranks-per-node", "positive"),
    (["--moe-grouped-gemm"], "--moe-grouped-gemm", "always run grouped"),
    (["--moe-single-grouped-weight"], "--moe-single-grouped-weight", ""),
    (["--moe-single-grouped-bias"], "--moe-single-grouped-bias", ""),
    (["--moe-mlp-glu-interleave-size", "32"], "--moe-mlp-glu-interleave-size", ""),
    (["--moe-apply-probs-on-input"], "--moe-apply-probs-on-input", "outputs"),
    (["--moe-latent-size", "16"], "--moe-latent-size", ""),
    (["--moe-paged-stash"], "--moe-paged-stash", ""),
    (["--moe-paged-stash-page-size", "32"], "--moe-paged-stash-page-size", ""),
    (["--moe-paged-stash-buffer-size-factor-cuda", "2"],
     "--moe-paged-stash-buffer-size-factor-cuda", ""),
    (["--moe-paged-stash-buffer-size-factor-cpu", "1"], "--moe-paged-stash-buffer-size-factor-cpu",
     ""),
    (["--save-tokens-per-expert-interval", "10"], "--save-tokens-per-expert-interval", ""),
    (["--use-grouped-gemm-for-shared-expert"], "--use-grouped-gemm-for-shared-expert", ""),
    (["--moe-shared-expert-glu-interleave-size", "32"], "--moe-shared-expert-glu-interleave-size",
     ""),
    (["--expert-tensor-parallel-size", "2"], "--expert-tensor-parallel-size", ""),
    (["--expert-tensor-parallel-num-weight-shards", "2"],
     "--expert-tensor-parallel-num-weight-shards", ""),
    (["--moe-layer-recompute", "--recompute-granularity", "full"], "--moe-layer-recompute",
     "--recompute-granularity full"),
    (["--moe-use-upcycling"], "--moe-use-upcycling", "upcycling"),
    (["--moe-upcycling-granularity", "2"], "--moe-upcycling-granularity", "upcycling"),
]


@pytest.mark.parametrize("flag", ["--moe-router-num-groups", "--moe-router-group-topk"])
def test_group_limited_routing_needs_both_group_flags(flag, monkeypatch):
    """Megatron limits groups only when both are given; one alone would route otherwise."""
    (other,) = {"--moe-router-num-groups", "--moe-router-group-topk"} - {flag}
    argv = _without(MOE, other)
    with pytest.raises(PluginError, match="--moe-router-num-groups and --moe-router-group-topk"):
        enabled(argv, monkeypatch)


def _without(argv: list[str], option: str) -> list[str]:
    """argv less `option` and its value."""
    at = argv.index(option)
    return argv[:at] + argv[at + 2:]


@pytest.mark.parametrize("argv, flag, why", REFUSALS,
                         ids=[" ".join(r[0]) for r in REFUSALS])
def test_refused_at_start_up_naming_the_flag(argv, flag, why, monkeypatch):
    with pytest.raises(PluginError) as refused:
        enabled(MOE + argv, monkeypatch)
    assert flag in str(refused.value) and why in str(refused.value), str(refused.value)


def without(flag: str) -> list[str]:
    return [a for a in MOE if a != flag]


@pytest.mark.parametrize("argv, message", [
    (MOE[:2] + MOE[4:], "--plugins moe needs --num-experts"),
    (MOE + ["--num-experts", "0"], "--num-experts 0 must be 1 or more"),
    (without("--moe-router-enable-expert-bias"), "--moe-router-enable-expert-bias"),
    (MOE + ["--moe-router-score-function", "softmax"], "--moe-router-score-function sigmoid"),
    (MOE + ["--moe-router-group-topk", "5"], "--moe-router-group-topk"),
    (MOE + ["--moe-router-topk", "5"], "--moe-router-topk"),
    (MOE + ["--moe-router-num-groups", "3"], "--moe-router-num-groups"),
    (MOE + ["--moe-fp8-dispatch", "--hidden-size", "96"], "--hidden-size"),
    (MOE + ["--moe-router-load-balancing-type", "aux_loss"], "--moe-router-load-balancing-type"),
    (MOE + ["--moe-router-load-balancing-type", "seq_aux_loss"], "--moe-aux-loss-coeff"),
    (["--moe-fp8-dispatch"], "--moe-fp8-dispatch needs '--plugins moe'"),
], ids=["no-experts", "zero-experts", "no-bias", "softmax", "group-topk", "topk", "groups", "fp8-hidden",
        "aux-loss", "seq-loss-without-coeff", "flag-without-plugin"])
def test_bad_configurations_fail_at_start(argv, message, monkeypatch):
    with pytest.raises(PluginError, match=re.escape(message)):
        enabled(argv, monkeypatch)


# Flags the plugin's layer honours (each checked below, or in the tests named).
HONOURED = {
    "--num-experts", "--moe-layer-freq", "--moe-ffn-hidden-size",
    "--moe-shared-expert-intermediate-size", "--moe-shared-expert-gate", "--moe-router-topk",
    "--moe-router-num-groups", "--moe-router-group-topk", "--moe-router-topk-scaling-factor",
    "--moe-router-score-function", "--moe-router-dtype", "--moe-router-enable-expert-bias",
    "--moe-router-bias-update-rate", "--moe-router-load-balancing-type", "--moe-aux-loss-coeff",
    "--moe-z-loss-coeff", "--moe-per-layer-logging", "--moe-layer-recompute",
    "--expert-model-parallel-size",  # tests/plugins/moe/test_layer.py: EP=2, 4 equal EP=1
    "--expert-tensor-parallel-size", "--expert-tensor-parallel-num-weight-shards",  # 1 only
}
# Inference and RL-inference settings: `megaseek pretrain` runs no inference engine.
NOT_FOR_TRAINING = {
    "--inference-moe-disable-fused-quant-kernels", "--inference-moe-token-dispatcher-type",
    "--rl-inference-expert-model-parallel-size",
    "--rl-inference-expert-tensor-model-parallel-size",
}


def test_every_moe_flag_of_megatron_is_decided():
    """Each Megatron flag about MoE or experts is refused (the table above), honoured (some
    of their values refused too), or not a training setting; a new one after an upgrade
    fails here until it is decided."""
    from megatron.training.arguments import add_megatron_arguments

    parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    flags = {option for action in parser._actions for option in action.option_strings
             if "moe" in option or "expert" in option}
    refused = {flag for _, flag, _ in REFUSALS}
    undecided = flags - refused - HONOURED - NOT_FOR_TRAINING
    assert not undecided, sorted(undecided)


def test_refused_flags_table_is_the_plugins():
    """Every entry of the plugin's table of refused flags is driven above."""
    from plugins.moe.plugin import REFUSED

    assert {flag for _, flag, _, _ in REFUSED} <= {f for _, f, _ in REFUSALS}


# --- honoured flags: each changes what it should -------------------------------------------

def _step(layer, dtype=torch.float32):
    """Output and router-weight gradient for fixed tokens."""
    out, _ = layer(tokens(dtype=dtype))
    out.float().square().mean().backward()
    return out.detach(), layer.router.weight.grad.clone()


def _tracked() -> dict[str, torch.Tensor]:
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    return {name: entry.values.clone() for name, entry in get_moe_metrics_tracker().metrics.items()}


def honoured_effects(rank, world_size):
    """{flag: (holds, detail)} for each honoured flag, on one rank."""
    import math

    from megatron.core import tensor_parallel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    from plugins import transform_spec
    from plugins.moe.balance import sequence_balance_loss, update_expert_bias
    from plugins.moe.layer import DeepSeekMoE
    from plugins import Enabled
    from plugins.moe.plugin import MOE as MOE_PLUGIN, MoEPluginConfig
    from tests.helpers.mla_build import megatron_ranks

    effects = {}
    with megatron_ranks():
        base = moe_layer()
        out, grad = _step(base)
        x = tokens().detach()
        indices, gates, scores = base.router(x)

        effects["--num-experts"] = (base.router.weight.shape[0] == EXPERTS
                                    and base.experts.weight1.shape[0] == EXPERTS, "")
        effects["--moe-ffn-hidden-size"] = (
            tuple(base.experts.weight2.shape) == (EXPERTS, HIDDEN, FFN), "")
        effects["--moe-router-topk"] = (indices.shape == (32, 2), "")
        effects["--moe-shared-expert-intermediate-size"] = (
            base.shared_experts.linear_fc2.weight.shape[1] == FFN
            and moe_layer(moe_shared_expert_intermediate_size=None).shared_experts is None, "")

        gated = moe_layer(moe_shared_expert_gate=True)
        effects["--moe-shared-expert-gate"] = (
            gated.shared_experts.gate_weight is not None and not torch.equal(_step(gated)[0], out),
            "the shared experts' output is scaled by a sigmoid gate")

        scaled = moe_layer(moe_router_topk_scaling_factor=2.5)
        effects["--moe-router-topk-scaling-factor"] = (
            torch.allclose(scaled.router(x)[1].sum(-1), torch.full((32,), 2.5)), "")

        grouped = moe_layer(moe_router_num_groups=4, moe_router_group_topk=1)
        chosen = grouped.router(x)[0]
        effects["--moe-router-num-groups"] = effects["--moe-router-group-topk"] = (
            bool(((chosen // 2)[:, 0] == (chosen // 2)[:, 1]).all()),
            "each token's experts lie in one group of 2")
        effects["--moe-router-score-function"] = (
            torch.allclose(scores, base.router.logits(x).sigmoid()), "sigmoid affinities")

        bias = torch.zeros(EXPERTS)
        effects["--moe-router-enable-expert-bias"] = effects["--moe-router-bias-update-rate"] = (
            torch.equal(update_expert_bias(bias, torch.tensor([3., 1] * 4), 0.01).abs(),
                        torch.full((EXPERTS,), 0.01)), "bias moves by the rate toward balance")

        # fp32 gates: the experts' outputs are weighed in fp32, not by bf16-rounded gates.
        low = moe_layer(params_dtype=torch.bfloat16)
        fp32 = moe_layer(params_dtype=torch.bfloat16, moe_router_dtype="fp32")
        effects["--moe-router-dtype"] = (not torch.equal(_step(low, torch.bfloat16)[0],
                                                         _step(fp32, torch.bfloat16)[0]), "")

        # The sequence-wise loss: its gradient joins the router's, its value is logged.
        get_moe_metrics_tracker().clear()
        seq = moe_layer(moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=1e-2)
        _, seq_grad = _step(seq)
        want = sequence_balance_loss(scores.view(16, 2, -1).transpose(0, 1).reshape(32, -1),
                                     indices.view(16, 2, -1).transpose(0, 1).reshape(32, -1),
                                     EXPERTS, 2, 16, 1.0)
        logged = float(_tracked()["seq_load_balancing_loss"][1])
        effects["--moe-router-load-balancing-type"] = effects["--moe-aux-loss-coeff"] = (
            not torch.equal(seq_grad, grad) and math.isclose(logged, want, rel_tol=1e-6)
            and logged > 0, f"logged {logged}, computed {float(want)}")

        # Megatron's z-loss: coeff * mean(logsumexp(logits)^2) adds its gradient; the log
        # shows mean(logsumexp(logits)^2) (divided by the coefficient, as Megatron's router).
        get_moe_metrics_tracker().clear()
        z = moe_layer(moe_z_loss_coeff=1e-1)
        _, z_grad = _step(z)
        logits = base.router.logits(x).detach().requires_grad_()
        mean_lse2 = torch.logsumexp(logits, -1).square().mean()
        (1e-1 * mean_lse2).backward()
        hidden = x.reshape(-1, HIDDEN)
        z_only = logits.grad.T @ hidden  # the z-loss's own gradient on the router weight
        logged = float(_tracked()["z_loss"][1])
        effects["--moe-z-loss-coeff"] = (
            torch.allclose(z_grad - grad, z_only, rtol=1e-4, atol=1e-7)
            and math.isclose(logged, mean_lse2.item(), rel_tol=1e-6),
            f"logged {logged}, computed {mean_lse2.item()}")

        # Per-layer logging: Megatron's report writes each layer's value.
        written = []

        class Writer:
            def add_scalar(self, name, value, iteration):
                written.append(name)

        get_moe_metrics_tracker().report(1.0, 1, writer=Writer(), per_layer_logging=True,
                                         track_names=["z_loss"], num_layers=2)
        effects["--moe-per-layer-logging"] = ("moe/z_loss_layer_1" in written, str(written))

        # --moe-layer-freq: the plugin's layer goes where Megatron's block spec has MoE.
        config = moe_layer(moe_layer_freq=[0, 1]).config
        block = transform_spec([Enabled(MOE_PLUGIN, MoEPluginConfig())],
                               get_gpt_decoder_block_spec(config, use_transformer_engine=False))
        effects["--moe-layer-freq"] = ([getattr(spec.submodules.mlp, "module", None) is DeepSeekMoE
                                        for spec in block.layer_specs] == [False, True], "")

        # --moe-layer-recompute: Megatron's config turns it into the 'moe' recompute.
        calls = []
        checkpoint = tensor_parallel.checkpoint
        tensor_parallel.checkpoint = lambda *a: calls.append(a) or checkpoint(*a)
        try:
            recomputed = moe_layer(moe_layer_recompute=True)
            effects["--moe-layer-recompute"] = (
                torch.equal(_step(recomputed)[1], grad) and len(calls) == 1, "")
        finally:
            tensor_parallel.checkpoint = checkpoint
    return effects


@pytest.fixture(scope="module")
def effects():
    return run_ranks(honoured_effects, 1)[0]


@pytest.mark.parametrize("flag", sorted(HONOURED - {
    "--expert-model-parallel-size", "--expert-tensor-parallel-size",
    "--expert-tensor-parallel-num-weight-shards"}))
def test_honoured_flag_changes_what_it_should(flag, effects):
    holds, detail = effects[flag]
    assert holds, detail
