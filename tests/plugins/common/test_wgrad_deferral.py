"""`--delay-wgrad-compute` without TE: every linear of a layer leaves its weight-gradient
GEMM to the W (`plugins.common.wgrad`), and the W writes what the undeferred backward
would have written.

Oracle: the same module with the flag off (Megatron's and megaseek's code as they run
today). Everything is compared with torch.equal: the deferred W runs the same GEMM on the
same tensors and adds it into the same buffer, so the bits must agree (fp32, CPU).
"""

from __future__ import annotations

import argparse
import contextlib

import pytest
import torch

import integration  # noqa: F401  (megatron.training on Python 3.11)
from tests.helpers.multirank import run_ranks

KINDS = ["column", "row", "replicated", "experts", "experts_loop", "experts_moe_act",
         "fp8_column", "fp8_row", "fp8_replicated", "fp8_experts"]
IN, OUT, TOKENS, EXPERTS = 128, 256, 6, 3   # fp8: `in` a multiple of 128; OUT != TOKENS * k
COUNTS = [3, 0, 3]                          # tokens per expert (one expert gets none)
MICROBATCHES = 3


def _config_fix():
    from tests.helpers.patching import patching
    from upstream.wgrad import DELAY_WGRAD_CONFIG

    return patching([DELAY_WGRAD_CONFIG])


def _config(delay: bool, **fields):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=IN, num_attention_heads=4,
                             add_bias_linear=False, use_cpu_initialization=True,
                             delay_wgrad_compute=delay, **fields)


def _build(kind: str, delay: bool):
    """(module, weight parameter, forward(x) -> tensor, input shape)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from plugins.common.experts import LocalExperts
    from plugins.common.linear import ReplicatedLinear
    from plugins.common.parallel_linear import (
        DeferringColumnParallelLinear,
        DeferringRowParallelLinear,
    )
    from plugins.fp8 import modules as fp8

    # experts_moe_act: fc2's input recomputed in backward (a saved-tensor recipe).
    recompute = dict(recompute_granularity="selective", recompute_modules=["moe_act"],
                     num_moe_experts=EXPERTS, moe_grouped_gemm=True)
    config = _config(delay, **(recompute if kind == "experts_moe_act" else {}))
    init = torch.nn.init.normal_
    torch.manual_seed(0)
    fp8_kw = dict(fp8_backend="emulated")
    if kind in ("column", "fp8_column"):
        cls = fp8.FP8ColumnParallelLinear if kind.startswith("fp8") else \
            (DeferringColumnParallelLinear if delay else ColumnParallelLinear)
        m = cls(IN, OUT, config=config, init_method=init, bias=False, gather_output=False,
                **(fp8_kw if kind.startswith("fp8") else {}))
        return m, m.weight, lambda x: m(x)[0], (TOKENS // 2, 2, IN)
    if kind in ("row", "fp8_row"):
        cls = fp8.FP8RowParallelLinear if kind.startswith("fp8") else \
            (DeferringRowParallelLinear if delay else RowParallelLinear)
        m = cls(IN, OUT, config=config, init_method=init, bias=False, input_is_parallel=True,
                skip_bias_add=True, **(fp8_kw if kind.startswith("fp8") else {}))
        return m, m.weight, lambda x: m(x)[0], (TOKENS // 2, 2, IN)
    if kind in ("replicated", "fp8_replicated"):
        cls = fp8.FP8ReplicatedLinear if kind.startswith("fp8") else ReplicatedLinear
        m = cls(IN, OUT, config=config, init_method=init,
                **(fp8_kw if kind.startswith("fp8") else {}))
        return m, m.weight, m, (TOKENS // 2, 2, IN)
    cls = fp8.FP8LocalExperts if kind == "fp8_experts" else LocalExperts
    m = cls(config, EXPERTS, IN, OUT // 2, **(fp8_kw if kind == "fp8_experts" else {}))
    return m, m.weight1, lambda x: m(x, COUNTS), (sum(COUNTS), IN)


def _like(reference, kind: str, delay: bool):
    """`_build(kind, delay)` with the weights of `reference` (initialization draws from
    Megatron's RNG tracker, which moves on with every module built)."""
    built = _build(kind, delay)
    with torch.no_grad():
        for mine, theirs in zip(built[0].parameters(), reference.parameters()):
            mine.copy_(theirs)
    return built


def _inputs(shape, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(shape, generator=g).requires_grad_() for _ in range(n)]


@contextlib.contextmanager
def _loop_experts(kind: str):
    """The experts' per-expert loop (where PyTorch has no grouped GEMM) instead of it."""
    if kind != "experts_loop":
        yield
        return
    from plugins.common import experts

    saved, experts._grouped_mm_available = experts._grouped_mm_available, lambda x: False
    try:
        yield
    finally:
        experts._grouped_mm_available = saved


class _WeightGemms(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every GEMM whose result has a weight's shape (or its transpose): a wgrad."""

    GEMMS = {"mm", "bmm", "addmm", "matmul", "_grouped_mm", "baddbmm"}

    def __init__(self, weight_shapes):
        super().__init__()
        self.shapes = {tuple(s) for s in weight_shapes} | {tuple(s)[::-1] for s in weight_shapes}
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        shapes = [tuple(out.shape)] if isinstance(out, torch.Tensor) else []
        if name in self.GEMMS and any(s[-2:] in self.shapes for s in shapes if len(s) >= 2):
            self.seen.append(f"{name}->{shapes[0]}")
        return out


def _one_kind(kind: str) -> dict:
    """Undeferred vs deferred on one micro-batch and on several: what the tests assert."""
    from plugins.common.wgrad import take_deferred_weight_gradients

    result = {}
    with _loop_experts(kind):
        # One micro-batch, gradients into param.grad.
        ref, ref_w, ref_fwd, shape = _build(kind, delay=False)
        (x,) = _inputs(shape, 1)
        with _WeightGemms([ref_w.shape, ref_w.shape[-2:]]) as gemms:
            ref_fwd(x).square().sum().backward()
        result["undeferred_gemms"] = gemms.seen
        first, ref_dx, ref_dw = ref, x.grad, ref_w.grad

        m, w, fwd, _ = _like(ref, kind, delay=True)
        (x,) = _inputs(shape, 1)
        with _WeightGemms([w.shape, w.shape[-2:]]) as gemms:
            fwd(x).square().sum().backward()
        result["deferred_gemms"] = gemms.seen
        result["dx_equal"] = torch.equal(x.grad, ref_dx)
        result["grad_before_w"] = w.grad
        run_w = take_deferred_weight_gradients(m)
        result["pending_after_take"] = len(m.deferred_wgrads)
        run_w()
        result["dw_equal"] = torch.equal(w.grad, ref_dw)
        result["others_equal"] = all(
            torch.equal(a.grad, b.grad) for (n, a), (_, b) in
            zip(ref.named_parameters(), m.named_parameters()) if a is not ref_w)

        # Several micro-batches into main_grad, as under DDP (whose hook adds param.grad
        # to main_grad after each backward); the W's after all B's, in backward order.
        ref, ref_w, ref_fwd, shape = _build(kind, delay=False)
        m, w, fwd, _ = _like(ref, kind, delay=True)
        for p in (*ref.parameters(), *m.parameters()):
            p.main_grad = torch.zeros_like(p)
        for x in _inputs(shape, MICROBATCHES):
            ref_fwd(x).square().sum().backward()
            for p in ref.parameters():
                p.main_grad.add_(p.grad)
                p.grad = None
        ws = []
        for x in _inputs(shape, MICROBATCHES):
            fwd(x).square().sum().backward()
            assert w.grad is None
            for p in m.parameters():
                if p.grad is not None:
                    p.main_grad.add_(p.grad)
                    p.grad = None
            ws.append(take_deferred_weight_gradients(m))
        for run_w in ws:
            run_w()
        result["main_grad_equal"] = all(torch.equal(a.main_grad, b.main_grad) for a, b in
                                        zip(ref.parameters(), m.parameters()))
        result["main_grad_nonzero"] = bool(w.main_grad.abs().sum() > 0)

        # Flag off: nothing is deferred, the gradient is there after backward.
        off, off_w, off_fwd, shape = _like(first, kind, delay=False)
        (x,) = _inputs(shape, 1)
        off_fwd(x).square().sum().backward()
        take_deferred_weight_gradients(off)()
        result["off_store"] = getattr(off, "deferred_wgrads", None)
        result["off_equal"] = torch.equal(off_w.grad, ref_dw)
    return result


def _every_kind(rank, world_size):
    from tests.helpers.mla_build import megatron_ranks

    with megatron_ranks(), _config_fix():
        return {kind: _one_kind(kind) for kind in KINDS}


@pytest.fixture(scope="module")
def per_kind():
    (results,) = run_ranks(_every_kind, 1, timeout=300)
    return results


@pytest.mark.parametrize("kind", KINDS)
def test_one_microbatch_is_bit_equal(per_kind, kind):
    r = per_kind[kind]
    assert r["dx_equal"], "input gradient differs"
    assert r["grad_before_w"] is None, "weight gradient written before the W"
    assert r["pending_after_take"] == 0
    assert r["dw_equal"], "deferred weight gradient differs"
    assert r["others_equal"]


@pytest.mark.parametrize("kind", KINDS)
def test_microbatches_accumulate_bit_equal_into_main_grad(per_kind, kind):
    r = per_kind[kind]
    assert r["main_grad_equal"] and r["main_grad_nonzero"]


@pytest.mark.parametrize("kind", KINDS)
def test_deferred_backward_runs_no_weight_gemm(per_kind, kind):
    """A linear that silently computed its wgrad in B would show a GEMM with the weight's
    shape here; the undeferred run shows that the detector sees them."""
    r = per_kind[kind]
    assert r["undeferred_gemms"], "the detector saw no wgrad GEMM in the undeferred run"
    assert r["deferred_gemms"] == [], r["deferred_gemms"]


@pytest.mark.parametrize("kind", KINDS)
def test_flag_off_defers_nothing(per_kind, kind):
    r = per_kind[kind]
    assert r["off_store"] is None and r["off_equal"]


# --- a Megatron model chunk -----------------------------------------------------------------

MLA_MOE = ["--multi-latent-attention", "--q-lora-rank", "32", "--kv-lora-rank", "32",
           "--qk-head-dim", "16", "--qk-pos-emb-head-dim", "8", "--v-head-dim", "16",
           "--num-experts", "4", "--moe-router-topk", "2", "--moe-router-score-function",
           "sigmoid", "--moe-router-enable-expert-bias", "--moe-ffn-hidden-size", "32",
           "--moe-shared-expert-intermediate-size", "32", "--moe-router-load-balancing-type",
           "none", "--moe-layer-freq", "([0]+[1]*1)", "--plugins", "mla", "moe"]
MODEL = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
         "--num-attention-heads", "4", "--seq-length", "8", "--max-position-embeddings", "8",
         "--micro-batch-size", "2", "--transformer-impl", "local",
         "--no-gradient-accumulation-fusion", "--swiglu", "--disable-bias-linear",
         "--normalization", "RMSNorm", "--no-persist-layer-norm", "--position-embedding-type", "none",
         "--hidden-dropout", "0", "--attention-dropout", "0"]
VOCAB = 64


def _deferring_plugin():
    """What the dualpipe plugin's spec transform does for `--delay-wgrad-compute`."""
    from plugins import Enabled, Plugin
    from plugins.common.parallel_linear import with_deferring_linears

    return Enabled(Plugin("deferring-linears", "test", transform_layer_spec=lambda config, spec:
                          with_deferring_linears(spec)), None)


def _chunk(argv, delay: bool, deferring_spec: bool = True):
    """A DDP-wrapped GPTModel chunk from Megatron's block spec and the plugins' transforms."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from tests.helpers.plugin_args import gpt_model, validated

    args, plugins = validated(MODEL + argv)
    args.delay_wgrad_compute = delay
    model = gpt_model(args, plugins + ([_deferring_plugin()] if deferring_spec else []), VOCAB)
    return DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)


def _grads(chunk, deferred: bool):
    """main_grad of every parameter after MICROBATCHES micro-batches; with deferral the W's
    run after all backwards, in their order."""
    from plugins.common.wgrad import take_deferred_weight_gradients

    g = torch.Generator().manual_seed(3)
    chunk.zero_grad_buffer()
    ws = []
    for _ in range(MICROBATCHES):
        tokens = torch.randint(VOCAB, (2, 9), generator=g)
        positions = torch.arange(8).expand(2, -1)
        loss = chunk(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).mean()
        loss.backward()
        ws.append(take_deferred_weight_gradients(chunk))
    for run_w in ws:
        run_w()
    return {n: p.main_grad.clone() for n, p in chunk.module.named_parameters()}


def _model_chunks(rank, world_size):
    from plugins import PluginError
    from plugins.common.wgrad import deferred_in, take_deferred_weight_gradients
    from tests.helpers.mla_build import megatron_ranks

    results = {}
    with megatron_ranks(), _config_fix():
        for name, argv in (("local", []), ("mla_moe", MLA_MOE)):
            ref = _chunk(argv, delay=False)
            deferred = _chunk(argv, delay=True)
            deferred.module.load_state_dict(ref.module.state_dict())
            results[name] = dict(
                stores=len(deferred_in(deferred)), ref_stores=len(deferred_in(ref)),
                ref=_grads(ref, False), deferred=_grads(deferred, True))
        plain = _chunk(MLA_MOE, delay=True, deferring_spec=False)
        try:
            take_deferred_weight_gradients(plain)
            results["refusal"] = None
        except PluginError as error:
            results["refusal"] = str(error)
        results["gtp_backstop"] = _gtp_weight_refused()
    return results


def _gtp_weight_refused() -> str | None:
    """A deferring linear handed a GTP-sharded weight (Megatron's gtp_remat_size > 1), which
    start-up refuses: the backstop's message, or None if it computed."""
    from plugins import PluginError
    from plugins.common.parallel_linear import DeferringColumnParallelLinear

    m = DeferringColumnParallelLinear(IN, OUT, config=_config(True), bias=False,
                                      init_method=torch.nn.init.normal_, gather_output=False)
    try:
        m._forward_impl(torch.randn(TOKENS, 1, IN), m.weight, bias=None,
                        gradient_accumulation_fusion=False, allreduce_dgrad=False,
                        sequence_parallel=False, gtp_remat_size=2)
    except PluginError as error:
        return str(error)
    return None


@pytest.fixture(scope="module")
def model_chunks():
    (results,) = run_ranks(_model_chunks, 1, timeout=300)
    return results


@pytest.mark.parametrize("spec", ["local", "mla_moe"])
def test_model_chunk_gradients_bit_equal(model_chunks, spec):
    r = model_chunks[spec]
    assert r["ref_stores"] == 0 and r["stores"] > 0
    assert r["ref"].keys() == r["deferred"].keys()
    differ = [n for n in r["ref"] if not torch.equal(r["ref"][n], r["deferred"][n])]
    assert differ == []


def test_a_layer_linear_that_cannot_defer_is_refused(model_chunks):
    """Megatron's own linears left in the layer spec (no deferring transform): the first
    take fails naming the module, instead of their wgrads running undeferred in B."""
    message = model_chunks["refusal"]
    assert message is not None and "--delay-wgrad-compute" in message
    assert "ColumnParallelLinear" in message or "RowParallelLinear" in message


def test_a_gtp_sharded_weight_reaching_a_deferring_linear_names_the_shard_flags(model_chunks):
    """Start-up refuses GTP weight shards with the flag (below); should one reach a
    deferring linear anyway, its error names the shard flags, not gradient-accumulation
    fusion, which has nothing to do with it."""
    message = model_chunks["gtp_backstop"]
    assert message is not None and message.startswith(
        "--delay-wgrad-compute cannot defer the weight gradient of "
        "DeferringColumnParallelLinear: GTP weight shards, 2 per tensor-parallel rank")
    assert "--tensor-parallel-num-weight-shards" in message
    assert "gradient-accumulation" not in message


# --- Megatron's flag without TE: the fixes, and what stays refused ---------------------------

def test_config_accepts_the_flag_with_the_fix():
    from megatron.core.transformer import TransformerConfig

    with pytest.raises(AssertionError, match="overlap_moe_expert_parallel_comm"):
        TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2,
                          delay_wgrad_compute=True)
    with _config_fix():
        assert TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2,
                                 delay_wgrad_compute=True).delay_wgrad_compute


def _validate(rank, world_size, fixed: bool):
    """Megatron's own argument check alone (the plugins' start-up checks, which refuse the
    flag without --plugins dualpipe, are tests/plugins/dualpipe/test_refusals.py's)."""
    import contextlib
    import io
    import sys

    from megatron.training import arguments

    from plugins import default_registry
    from tests.helpers.patching import patching
    from upstream.wgrad import DELAY_WGRAD_ARGUMENTS

    with patching([DELAY_WGRAD_ARGUMENTS] if fixed else []) as patcher:
        patcher.setattr(sys, "argv", ["pretrain", *MODEL, "--delay-wgrad-compute",
                                      "--transformer-impl", "local"])
        try:
            args = arguments.parse_args(extra_args_provider=default_registry().add_arguments)
            with contextlib.redirect_stdout(io.StringIO()):
                arguments.validate_args(args, {})  # as patched (looked up now)
            return bool(args.delay_wgrad_compute)
        except AssertionError as error:
            return str(error)


def test_validate_args_lets_the_flag_through_without_te():
    (refused,) = run_ranks(_validate, 1, False, timeout=120)
    assert "only supported with transformer_engine" in refused
    (passed,) = run_ranks(_validate, 1, True, timeout=120)
    assert passed is True


def test_the_arguments_fix_will_not_replace_the_argument_seam(patcher):
    """It must be in place before the seam wraps validate_args; applied after, it says so
    rather than silently dropping the seam."""
    from upstream.seams.arguments import checks_before_argument_dump
    from upstream.wgrad import DELAY_WGRAD_ARGUMENTS

    checks_before_argument_dump(lambda args: None).apply(patcher)
    with pytest.raises(RuntimeError, match="apply this fix before"):
        DELAY_WGRAD_ARGUMENTS.apply(patcher)


@pytest.mark.parametrize("flags,refused", [
    (dict(), None),
    (dict(transformer_impl="transformer_engine"), "--transformer-impl transformer_engine"),
    (dict(overlap_grad_reduce=True), "--overlap-grad-reduce"),
    (dict(gradient_accumulation_fusion=True), "--gradient-accumulation-fusion"),
    (dict(tensor_parallel_num_weight_shards=2), "--tensor-parallel-num-weight-shards 2 "
     "cannot be combined with --delay-wgrad-compute: it shards each weight over more ranks "
     "than --tensor-model-parallel-size 1 (GTP)"),
    (dict(expert_tensor_parallel_num_weight_shards=4, expert_tensor_parallel_size=2),
     "--expert-tensor-parallel-num-weight-shards 4 cannot be combined with "
     "--delay-wgrad-compute: it shards each weight over more ranks than "
     "--expert-tensor-parallel-size 2 (GTP)"),
    # as many weight shards as tensor-parallel ranks: no GTP
    (dict(tensor_model_parallel_size=2, tensor_parallel_num_weight_shards=2), None),
])
def test_flags_the_deferral_cannot_honour_are_refused(flags, refused):
    from plugins.common.wgrad_checks import delay_wgrad_refusal

    args = argparse.Namespace(**{**dict(delay_wgrad_compute=True, transformer_impl="local",
                                        overlap_grad_reduce=False,
                                        gradient_accumulation_fusion=False,
                                        tensor_model_parallel_size=1), **flags})
    message = delay_wgrad_refusal(args)
    if refused is None:
        assert message is None
    else:
        assert message.startswith(refused) and "--delay-wgrad-compute" in message
    args.delay_wgrad_compute = False
    assert delay_wgrad_refusal(args) is None


def test_gtp_weight_shards_are_refused_at_start_up(monkeypatch):
    """Through the launch path's argument parsing and the dualpipe plugin's start-up check
    (which runs `delay_wgrad_refusal`): refused before any model is built, naming both
    flags; it used to surface at the first forward, telling the user to pass
    --no-gradient-accumulation-fusion."""
    from plugins import PluginError
    from tests.helpers.plugin_args import enabled

    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", "64", "--max-position-embeddings", "64", "--micro-batch-size", "1",
            "--global-batch-size", "8", "--untie-embeddings-and-output-weights",
            "--pipeline-model-parallel-size", "2", "--plugins", "dualpipe",
            "--pipeline-schedule", "dualpipev", "--transformer-impl", "local",
            "--no-gradient-accumulation-fusion", "--delay-wgrad-compute"]
    enabled(argv, monkeypatch)  # the same run without GTP starts
    with pytest.raises(PluginError) as refused:
        enabled(argv + ["--tensor-parallel-num-weight-shards", "2"], monkeypatch)
    message = str(refused.value)
    assert message.startswith("--tensor-parallel-num-weight-shards 2 cannot be combined with "
                              "--delay-wgrad-compute")
    assert message.endswith("Drop --tensor-parallel-num-weight-shards or --delay-wgrad-compute")


def test_fp8_maps_the_deferring_linears_in_either_order():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from plugins.common.parallel_linear import with_deferring_linears
    from plugins.fp8.spec import count_fp8_linears, with_fp8_linears

    spec = get_gpt_layer_local_spec()
    assert count_fp8_linears(with_fp8_linears(with_deferring_linears(spec), "emulated")) == 4
    assert count_fp8_linears(with_deferring_linears(with_fp8_linears(spec, "emulated"))) == 4
