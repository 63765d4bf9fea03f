"""`--plugins moe`: Megatron's MoE flags with DeepSeek-V3's router, balancing and
expert-parallel dispatch, through Megatron's training loop."""

from __future__ import annotations

import re

import pytest
import torch

import integration  # noqa: F401
from tests.helpers import paths
from tests.helpers.plugin_args import enabled as parse_enabled
from tests.helpers.training_runs import TINY_GPT, losses, pretrain, torchrun

MOE = ["--plugins", "moe", "--num-experts", "8", "--moe-router-topk", "2",
       "--moe-router-num-groups", "4", "--moe-router-group-topk", "2",
       "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
       "--moe-router-bias-update-rate", "1e-2", "--moe-router-topk-scaling-factor", "2.5",
       "--moe-ffn-hidden-size", "64", "--moe-shared-expert-intermediate-size", "64",
       "--moe-router-load-balancing-type", "none", "--disable-bias-linear", "--swiglu"]
BASE = ["--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "4",
        "--seq-length", "64", "--max-position-embeddings", "64", "--micro-batch-size", "2",
        "--transformer-impl", "local"]


def enabled(argv, monkeypatch):
    return parse_enabled(BASE + argv, monkeypatch)


def test_moe_enabled(monkeypatch):
    args, plugins = enabled(MOE + ["--moe-fp8-dispatch"], monkeypatch)
    assert [p.name for p in plugins] == ["moe"] and args.moe_fp8_dispatch


@pytest.mark.slow
def test_trains_with_ep2_fp8_experts_fp8_two_hop_dispatch_and_balances(tmp_path):
    """EP=2 on 2 gloo ranks (2 simulated nodes), first layer dense, FP8 dispatch, and the
    routed experts' GEMMs in FP8 (--plugins moe fp8; 128-wide expert FFNs, whole FP8
    tiles): the loss falls, by iteration 20 already, and the bias updates after each
    optimizer step bring the load toward balance. (One run for what were two tests, FP8
    experts and two-hop dispatch with balancing: one start-up fewer.)"""
    out = pretrain(MOE + ["--plugins", "moe", "fp8", "--fp8-format", "e4m3",
                          "--fp8-recipe", "blockwise", "--hidden-size", "128",
                          "--ffn-hidden-size", "256", "--moe-ffn-hidden-size", "128",
                          "--moe-shared-expert-intermediate-size", "128",
                          "--expert-model-parallel-size", "2",
                          "--moe-layer-freq", "([0]+[1]*1)", "--moe-fp8-dispatch",
                          "--moe-dispatch-ranks-per-node", "1", "--train-iters", "40",
                          "--moe-router-load-balancing-type", "seq_aux_loss",
                          "--moe-aux-loss-coeff", "1e-4",
                          "--log-interval", "5"], tmp_path)
    curve = losses(out)
    assert curve[20] < curve[5] - 0.5  # measured 5.61 -> 3.74 (-> 3.39 at 40)
    assert curve[40] < curve[5] - 0.5
    imbalance = [float(v) for v in re.findall(r"moe layer 0: load max/mean ([0-9.]+)", out)]
    assert len(imbalance) == 8  # one MoE layer, logged every 5 of 40 steps
    assert sum(imbalance[-3:]) / 3 < sum(imbalance[:3]) / 3, str(imbalance)
    # Two simulated nodes (one rank each): the share of routed tokens per node sums to 1.
    shares = re.findall(r"tokens per node ([0-9.]+)/([0-9.]+)", out)
    assert len(shares) == 8 and all(abs(float(a) + float(b) - 1) < 0.02 for a, b in shares)


@pytest.mark.slow
def test_checkpoint_saved_at_ep2_loads_at_ep1(tmp_path):
    """Experts are sharded over EP ranks in Megatron's distributed checkpoint, the router's
    bias travels with it: the EP=1 run evaluates exactly as the EP=2 run that saved."""
    from tests.helpers.training_runs import final_validation_loss

    common = MOE + ["--hidden-size", "128", "--make-vocab-size-divisible-by", "256",
                    "--train-iters", "4"]
    saved = pretrain(common + ["--expert-model-parallel-size", "2",
                               "--save", str(tmp_path / "ck"), "--save-interval", "4"], tmp_path)
    loaded = pretrain(common + ["--expert-model-parallel-size", "1", "--load",
                                str(tmp_path / "ck"), "--no-load-optim", "--no-load-rng"], tmp_path)
    assert "loading distributed checkpoint" in loaded and not losses(loaded)
    assert final_validation_loss(loaded) == pytest.approx(final_validation_loss(saved), abs=1e-5)


def build_experts(fp8_backend=None, hidden=128, ffn=128, **fp8):
    from megatron.core.transformer import TransformerConfig

    from plugins.common.experts import LocalExperts
    from plugins.fp8.modules import FP8LocalExperts

    config = TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=4,
                               use_cpu_initialization=True, perform_initialization=False)
    experts = (LocalExperts(config, 3, hidden, ffn) if fp8_backend is None
               else FP8LocalExperts(config, 3, hidden, ffn, fp8_backend=fp8_backend, **fp8))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        experts.weight1.copy_(torch.randn(3, 2 * ffn, hidden, generator=g) / 12)
        experts.weight2.copy_(torch.randn(3, hidden, ffn, generator=g) / 12)
    return experts, torch.randn(200, hidden, generator=g)


@pytest.mark.parametrize("dispatched_fp8", [False, True], ids=["bf16-tokens", "fp8-tokens"])
def test_fp8_experts_compute_the_fp8_products(dispatched_fp8):
    """With the fp8 plugin on, each routed expert runs fc1 and fc2 as FP8 GEMMs with the
    SwiGLU input cached in FP8; tokens that came by FP8 dispatch enter fc1 as sent."""
    from plugins.common.quantize import quantize
    from plugins.fp8.linear import fp8_linear
    from plugins.fp8.swiglu import FP8CachedSwiGLU

    experts, tokens = build_experts("emulated")
    counts = [128, 0, 72]  # an expert with no tokens still takes part
    sent = quantize(tokens, (1, 128), power_of_two_scales=True) if dispatched_fp8 else None
    out = experts(tokens, counts, sent)
    for rows, e in ((slice(0, 128), 0), (slice(128, 200), 2)):
        x_fp8 = (sent[0][rows], sent[1][rows]) if dispatched_fp8 else None
        want = fp8_linear(FP8CachedSwiGLU.apply(
            fp8_linear(tokens[rows], experts.weight1[e], x_fp8=x_fp8)), experts.weight2[e])
        assert torch.equal(out[rows], want)
    out.square().sum().backward()
    assert torch.equal(experts.weight1.grad[1], torch.zeros_like(experts.weight1[1]))


@pytest.mark.parametrize("token_multiple", [1, 128])
def test_fp8_experts_never_wait_on_the_device(token_multiple):
    """A layer's experts record their operands' inf/NaN on the device (the fp8 plugin reads
    the flags once per step): no host synchronization with tokens in the training dtype or
    from FP8 dispatch, weights quantized or held (--fp8-cache-weights), each expert's
    tokens padded or not. They waited once per projection before."""
    from plugins.common.quantize import quantize
    from plugins.fp8.weight_cache import FP8WeightCache
    from tests.helpers.host_syncs import device_waits

    experts, tokens = build_experts("emulated", token_multiple=token_multiple)
    counts = [128, 0, 72]
    sent = quantize(tokens, (1, 128), power_of_two_scales=True)
    for cache in (None, FP8WeightCache(experts._record_weight)):
        experts.fp8_weight_cache = cache
        for given in (None, sent, None):  # with a cache: quantized, then held
            with device_waits() as waits:
                experts(tokens, counts, given)
            assert waits == []


def _expert_step(experts, tokens, counts, sent):
    tokens = tokens.clone().requires_grad_(True)
    out = experts(tokens, counts, sent)
    out.square().sum().backward()
    return [out, tokens.grad, experts.weight1.grad, experts.weight2.grad]


# Expert token counts of 12 or more (or none): CPU BLAS sums a product row alike for any
# number of rows from 12 on, so padding cannot change a bit there; below 12 rows its
# kernels differ (an fp32 rounding, not the padding's doing).
PADDED_COUNTS = [130, 0, 70]


@pytest.mark.parametrize("multiple", [4, 128])
@pytest.mark.parametrize("dispatched_fp8", [False, True], ids=["bf16-tokens", "fp8-tokens"])
def test_fp8_experts_padded_to_a_row_multiple_give_the_same_bits(multiple, dispatched_fp8):
    """Each expert's tokens zero-padded to a multiple of 4 (cuBLAS) or 128 (whole Wgrad
    tiles) before fc1 and cut off after fc2: outputs and gradients as without padding, bit
    for bit (emulated backend, fp32)."""
    from plugins.common.quantize import quantize

    results = []
    for token_multiple in (1, multiple):
        experts, tokens = build_experts("emulated", token_multiple=token_multiple)
        sent = quantize(tokens, (1, 128), power_of_two_scales=True) if dispatched_fp8 else None
        results.append(_expert_step(experts, tokens, PADDED_COUNTS, sent))
    for unpadded, padded in zip(*results):
        assert torch.equal(unpadded, padded)


def test_fp8_experts_hand_the_gemms_rows_cublas_takes_without_a_copy(monkeypatch):
    """With the torch backend's row multiple (4), no expert GEMM operand needs
    `_cublas_aligned`'s zero-row padding (a copy of A per GEMM); unpadded, the experts
    with 130 and 70 tokens need it in fc1's and fc2's Fprop and Dgrad."""
    from plugins.fp8 import backends

    operands = []

    def recording(a, b, out_dtype=torch.float32):
        operands.append((a, b))
        return backends.emulated_gemm(a, b, out_dtype)

    monkeypatch.setitem(backends.BACKENDS, "emulated", recording)
    padded_rows = []
    pad = backends._pad

    def counting(x, rows, k_blocks):
        padded_rows.append(rows)
        return pad(x, rows, k_blocks)

    monkeypatch.setattr(backends, "_pad", counting)
    copies = {}
    for token_multiple in (1, backends.ROW_MULTIPLE["torch"]):
        experts, tokens = build_experts("emulated", token_multiple=token_multiple)
        operands.clear()
        _expert_step(experts, tokens, PADDED_COUNTS, None)
        padded_rows.clear()
        for a, b in operands:
            backends._cublas_aligned(a, b)
        copies[token_multiple] = sum(rows > 0 for rows in padded_rows)
    assert copies == {1: 8, 4: 0}  # 2 experts x (fc1, fc2) x (Fprop, Dgrad)


def test_fp8_experts_refuse_a_token_multiple_below_one():
    with pytest.raises(ValueError, match="token_multiple must be >= 1"):
        build_experts("emulated", token_multiple=0)


def _padded_experts_at_ep(rank, world, fp8_dispatch):
    """FP8 dispatch (or BF16), the FP8 experts, combine and backward, unpadded and with
    each expert's rows padded to 4 and 128: by the dispatch, as the moe layer asks for
    the experts' `token_multiple`, or (dispatch unpadded) by the experts themselves.
    Outputs, input gradients and weight gradients of each, and the padded counts."""
    from plugins.moe.dispatch import combine, dispatch

    g = torch.Generator().manual_seed(7)
    tokens_per_rank, experts_total, top_k = 96, 3 * world, 2  # 3 local experts
    hidden = torch.randn(world * tokens_per_rank, 128, generator=g)
    indices = torch.randn(world * tokens_per_rank, experts_total, generator=g).topk(top_k).indices
    gates = torch.rand(world * tokens_per_rank, top_k, generator=g)
    mine = slice(rank * tokens_per_rank, (rank + 1) * tokens_per_rank)
    results, counts = {}, {}
    for token_multiple, by_dispatch in ((1, False), (4, False), (128, False), (4, True),
                                        (128, True)):
        experts, _ = build_experts("emulated", token_multiple=token_multiple)
        with torch.no_grad():  # each rank's own experts
            for w in (experts.weight1, experts.weight2):
                w.mul_(1 + rank)
        x = hidden[mine].clone().requires_grad_(True)
        d = dispatch(x, indices[mine], experts_total, None, fp8=fp8_dispatch,
                     pad_to=experts.token_multiple if by_dispatch else 1)
        sent = (d.fp8_q, d.fp8_scales) if fp8_dispatch else None
        out = combine(experts(d.tokens, d.tokens_per_expert, sent), d, gates[mine], None)
        out.square().sum().backward()
        results[(token_multiple, by_dispatch)] = [out.detach(), x.grad, experts.weight1.grad,
                                                  experts.weight2.grad]
        counts[(token_multiple, by_dispatch)] = d.tokens_per_expert
    return counts, results


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("fp8_dispatch", [False, True], ids=["bf16-dispatch", "fp8-dispatch"])
def test_fp8_experts_padded_at_dispatch_give_the_same_bits(fp8_dispatch, world):
    """At EP=1 and EP=2 (gloo), tokens dispatched to FP8 experts with each expert's rows
    padded by the dispatch (or by the experts) and combined: outputs and gradients as
    without padding, bit for bit."""
    from tests.helpers.multirank import run_ranks

    for counts, results in run_ranks(_padded_experts_at_ep, world, fp8_dispatch):
        unpadded = counts[(1, False)]
        assert all(c >= 12 for c in unpadded)  # see PADDED_COUNTS
        assert any(c % 4 for c in unpadded)  # padding happened
        for multiple in (4, 128):
            assert counts[(multiple, True)] == [c + -c % multiple for c in unpadded]
            for by_dispatch in (False, True):
                for plain, padded in zip(results[(1, False)], results[(multiple, by_dispatch)]):
                    assert torch.equal(plain, padded)


def test_grouped_gemm_equals_the_loop_over_experts(monkeypatch):
    """torch._grouped_mm (one GEMM per projection for all experts; on the CPU too) against
    the per-expert loop, forward and backward, with an expert that gets no tokens."""
    import plugins.common.experts as experts_module

    experts, tokens = build_experts(hidden=64, ffn=32)
    counts = [90, 0, 110]
    results = []
    for grouped in (True, False):
        monkeypatch.setattr(experts_module, "_grouped_mm_available", lambda x, g=grouped: g)
        experts.zero_grad()
        x = tokens.clone().requires_grad_()
        out = experts(x, counts)
        out.sum().backward()  # a stride-0 gradient, which _grouped_mm's backward rejects
        results.append((out, x.grad, experts.weight1.grad.clone(), experts.weight2.grad.clone()))
    for grouped, loop in zip(*results):
        torch.testing.assert_close(grouped, loop, rtol=1e-5, atol=1e-5)  # summation order


def test_megatron_still_gates_moe_fp8_on_transformer_engine():
    """The fp8 plugin lifts this upstream gate for its own MoE FP8; once upstream drops it,
    this test fails and upstream.transformer's fp8-moe-without-te can go."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from upstream.patching import source_has
    from upstream.transformer import MOE_FP8_NEEDS_TE

    assert source_has(TransformerConfig.__post_init__, MOE_FP8_NEEDS_TE)


PROBE = str(paths.LAUNCH_SCRIPTS / "moe_loss_probe.py")
_LOGGED = re.compile(r"iteration\s+(\d+)/.*?seq_load_balancing_loss: ([0-9.E+-]+) \| "
                     r"z_loss: ([0-9.E+-]+)")
_STEP = re.compile(r"iteration\s+\d+/.*?number of nan iterations:\s+\d+ \||"
                   r"moe layer \d+: load .*?tokens per node [0-9./]+")
_TIMING = re.compile(r"elapsed time per iteration \(ms\): [0-9.]+ \| ")


def _step_numbers(output: str) -> list[str]:
    """Each logged iteration's numbers (losses, grad norm) and the expert-load lines (loads,
    bias), less timings. Matched inside lines: the ranks' output may run together."""
    return [_TIMING.sub("", found) for found in _STEP.findall(output)]


@pytest.mark.slow
def test_logs_the_auxiliary_losses_it_takes_and_recomputes_them_alike(tmp_path):
    """Megatron's log line shows the sequence-wise balance loss and the z-loss the MoE layer
    computed (divided by their coefficients, as for Megatron's router): per iteration, the
    mean over micro-batches and data-parallel ranks of what the layer recorded, not 0. With
    every MoE recomputation (moe, shared_experts, moe_act), and with the full one, the run
    logs the same steps: losses, gradient norm, expert loads and bias."""

    argv = TINY_GPT + MOE + ["--expert-model-parallel-size", "2", "--moe-layer-freq",
                             "([0]+[1]*1)", "--moe-router-load-balancing-type", "seq_aux_loss",
                             "--moe-aux-loss-coeff", "1e-2", "--moe-z-loss-coeff", "1e-3",
                             "--train-iters", "3"]
    out = torchrun([PROBE], argv, tmp_path)
    recorded: dict[tuple[int, str], list[float]] = {}
    # (the ranks' lines may run together: no anchors)
    for iteration, _, name, value in re.findall(r"aux (\d+) (\d+) (\w+) ([-+.e\d]+)", out):
        recorded.setdefault((int(iteration), name), []).append(float(value))
    logged = {int(i): (float(seq), float(z)) for i, seq, z in _LOGGED.findall(out)}
    assert sorted(logged) == [1, 2, 3]
    for iteration in (1, 3):  # (iteration 2's line also averages iteration 1, training.py:2594)
        for name, value in zip(("seq_load_balancing_loss", "z_loss"), logged[iteration]):
            values = recorded[(iteration, name)]
            assert len(values) == 4  # 2 ranks x 2 micro-batches, one MoE layer
            assert value > 0 and value == pytest.approx(sum(values) / 4, rel=1e-6)

    steps = _step_numbers(out)
    assert len(steps) == 6, steps
    for recompute in (["--recompute-granularity", "selective", "--recompute-modules", "moe",
                       "shared_experts", "moe_act"],
                      ["--recompute-granularity", "full", "--recompute-method", "uniform",
                       "--recompute-num-layers", "1"]):
        assert _step_numbers(torchrun([PROBE], argv + recompute, tmp_path)) == steps, recompute
