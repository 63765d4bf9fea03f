"""`--fp8-cache-weights` (plugins.fp8.weight_cache): each weight is quantized once per
training step instead of in every micro-batch's forward and backward, with the same bits,
and never used stale."""

from __future__ import annotations

import pytest
import torch

from plugins.fp8.linear import fp8_linear
from plugins.fp8.weight_cache import (FP8WeightCache, quantize_weight, quantize_weight_transposed,
                                      quantize_weight_with_transposed)
from tests.helpers.multirank import run_ranks
from tests.plugins.fp8.test_loss_gap import DEEPSEEK_V3, FP8, MODEL
from tests.plugins.moe.test_plugin import build_experts
from tests.helpers.training_runs import losses, torchrun


def forward_backward(x, w, dy, **kw):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8_linear(x, w, **kw)
    y.backward(dy)
    return y, x.grad, w.grad


def test_a_cached_weight_gives_the_same_bits():
    g = torch.Generator().manual_seed(0)
    x, w, dy = torch.randn(200, 256, generator=g), torch.randn(576, 256, generator=g), \
        torch.randn(200, 576, generator=g)  # ragged out and tokens: padded alike
    cache = FP8WeightCache()
    want = forward_backward(x, w, dy)
    for held in (dict(weight_fp8=cache.get(w)),  # W^T transposed from W's bytes
                 dict(weight_fp8=cache.get(w), weight_fp8_t=lambda: cache.get_transposed(w))):
        for got, expected in zip(forward_backward(x, w, dy, **held), want):
            assert torch.equal(got, expected)
    assert cache.transposed_quantizations == 1


def test_w_transposed_is_w_quantized_then_transposed():
    """Square blocks: W^T's quantization is W's, transposed, bit for bit (576 rows: the
    last block half zero padding, as MLA's kv down-projection)."""
    w = torch.randn(576, 384, generator=torch.Generator().manual_seed(1), dtype=torch.bfloat16)
    w_q, w_t = quantize_weight(w), quantize_weight_transposed(w)
    assert w_t.q.shape == (384, 640) and w_t.scales.shape == (3, 5)
    assert torch.equal(w_t.q.view(torch.uint8), w_q.q.view(torch.uint8).t())
    assert torch.equal(w_t.scales, w_q.scales.t())
    # And both from one read of W, as the cache takes them: the same bits.
    for got, want in zip(quantize_weight_with_transposed(w), (w_q, w_t)):
        assert torch.equal(got.q.view(torch.uint8), want.q.view(torch.uint8))
        assert torch.equal(got.scales, want.scales) and got.scales.is_contiguous()


def test_w_and_w_transposed_come_from_one_read_when_backward_will_need_both():
    """With autograd on, the first `get` of a step writes W and W^T in one pass over W;
    the backward's `get_transposed` finds W^T held. Without autograd (evaluation) only W is
    written, and W^T only if asked for."""
    w = torch.randn(576, 256)
    cache = FP8WeightCache()
    held = cache.get(w)
    assert cache.reads == cache.quantizations == cache.transposed_quantizations == 1
    assert torch.equal(cache.get_transposed(w).q.view(torch.uint8),
                       quantize_weight_transposed(w).q.view(torch.uint8))
    assert cache.reads == 1 and cache.get(w) is held
    cache.drop()
    with torch.no_grad():
        cache.get(w)
    assert cache.reads == 2 and cache.transposed_quantizations == 1
    cache.get_transposed(w)
    assert cache.reads == 3 and cache.transposed_quantizations == 2


def test_the_cache_holds_until_dropped_or_changed_in_place():
    w = torch.nn.Parameter(torch.randn(256, 256))
    cache = FP8WeightCache()
    first = cache.get(w)
    assert cache.get(w) is first and cache.quantizations == 1
    # Megatron's optimizer writes new weights through .data or into its buffers, which no
    # version counter sees: the copy is stale until dropped, hence the plugin drops every
    # cache after each optimizer step.
    w.data.mul_(2)
    assert cache.get(w) is first
    cache.drop()
    fresh = cache.get(w)
    assert torch.equal(fresh.scales, 2 * first.scales) and cache.quantizations == 2
    with torch.no_grad():  # an ordinary in-place change moves the version counter
        w.mul_(2)
    assert torch.equal(cache.get(w).scales, 4 * first.scales) and cache.quantizations == 3
    # W^T alike, under the same version rules (each `get` above wrote it with W)
    first_t = cache.get_transposed(w)
    assert cache.get_transposed(w) is first_t and cache.transposed_quantizations == 3
    assert torch.equal(first_t.scales, cache.get(w).scales.t())
    cache.drop()
    assert cache.get_transposed(w) is not first_t and cache.transposed_quantizations == 4
    other = w.detach().clone()  # another tensor in the same slot
    assert cache.get(other) is not cache.get(w)


def test_a_held_weight_costs_a_byte_per_element_and_orientation():
    w = torch.randn(7168, 2048, dtype=torch.bfloat16)  # DeepSeek-V3's expert fc2 shape
    cache = FP8WeightCache()
    for held, shape in ((cache.get(w), w.shape), (cache.get_transposed(w), w.shape[::-1])):
        held_bytes = sum(t.untyped_storage().nbytes() for t in (held.q, held.scales))
        assert held_bytes == w.numel() + 4 * w.numel() // (128 * 128)  # half of BF16's bytes
        assert held.q.shape == shape


def test_a_non_finite_weight_raises_naming_it():
    w = torch.randn(256, 256)
    w[130, 3] = float("nan")
    with pytest.raises(ValueError, match=r"the weight has non-finite .*row tile 1, col tile 0"):
        FP8WeightCache().get(w)
    assert torch.isinf(quantize_weight(w, check_finite=False).scales[1, 0])


def megatron_linears(rank, world_size):
    """Megatron's column-parallel FP8 linear with and without the cache, same weights:
    (quantizations after two micro-batches, whether every output and gradient agreed)."""
    from megatron.core.transformer import TransformerConfig

    from plugins.fp8.modules import FP8ColumnParallelLinear
    from tests.helpers.mla_build import megatron_ranks

    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 128, generator=g)
    batches = [(torch.randn(64, 2, 128, generator=g), torch.randn(64, 2, 256, generator=g))
                for _ in range(2)]
    with megatron_ranks():
        config = TransformerConfig(num_layers=1, hidden_size=128, num_attention_heads=4,
                                   use_cpu_initialization=True, add_bias_linear=False)
        results = []
        for cache_weights in (False, True):
            fc = FP8ColumnParallelLinear(128, 256, config=config, bias=False,
                                         init_method=torch.nn.init.zeros_, gather_output=True,
                                         fp8_cache_weights=cache_weights)
            with torch.no_grad():
                fc.weight.copy_(w)
            outputs = []
            for x, dy in batches:
                x = x.clone().requires_grad_()
                y, _ = fc(x)
                y.backward(dy)
                outputs += [y.detach(), x.grad]
            results.append((outputs, fc.weight.grad, fc.fp8_weight_cache))
        (plain, plain_grad, none), (cached, cached_grad, cache) = results
    return (none, (cache.reads, cache.quantizations, cache.transposed_quantizations),
            all(map(torch.equal, plain, cached)) and torch.equal(plain_grad, cached_grad))


def test_megatron_linear_quantizes_its_weight_once_for_all_micro_batches():
    no_cache, counts, same = run_ranks(megatron_linears, 1)[0]
    assert no_cache is None and counts == (1, 1, 1) and same  # W and W^T from one read


def test_experts_quantize_each_weight_once():
    counts = [128, 0, 72]
    plain, tokens = build_experts("emulated")
    cached, _ = build_experts("emulated")
    cached.fp8_weight_cache = FP8WeightCache()
    for _ in range(2):  # two micro-batches
        for experts in (plain, cached):
            experts(tokens, counts).square().sum().backward()
    cache = cached.fp8_weight_cache
    assert cache.quantizations == 6  # fc1 and fc2 of 3 experts
    assert cache.reads == cache.transposed_quantizations == 6  # W and W^T in one pass
    assert torch.equal(cached.weight1.grad, plain.weight1.grad)
    assert torch.equal(cached.weight2.grad, plain.weight2.grad)


@pytest.mark.slow
def test_training_with_cached_weights_is_training_without(tmp_path):
    """Megatron's loop on 2 ranks (EP=2, the distributed optimizer, 2 micro-batches per
    step), DeepSeek-V3-style with every linear in FP8: the loss curve with cached weights
    is the curve without. A cache not dropped after each step would reuse the first step's
    weights and part from it after the first step."""
    args = [*MODEL, *DEEPSEEK_V3, "--plugins", "mla", "moe", "fp8", *FP8[2:],
            "--moe-fp8-dispatch", "--use-distributed-optimizer", "--train-iters", "6",
            "--lr-warmup-iters", "1"]
    plain = losses(torchrun(["-m", "integration.pretrain"], args, tmp_path))
    cached = losses(torchrun(["-m", "integration.pretrain"], args + ["--fp8-cache-weights"],
                             tmp_path))
    assert len(plain) == 6 and cached == plain
    assert plain[6] < plain[1]  # it trained
