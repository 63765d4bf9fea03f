"""plugins.mla: parity with Hugging Face's DeepseekV3 attention, TP=2 (and sequence
parallel) and context parallelism against one rank, and selective recomputation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from plugins.mla.convert import from_interleaved_rope
from tests.helpers import backend
from tests.helpers.backend import device
from tests.helpers.mla_build import build_attention, build_layer, megatron_ranks, shard
from tests.helpers.mla_oracle import MLAShape, hf_mla, random_weights
from tests.helpers.multirank import run_ranks

DEEPSEEK_YARN = dict(factor=4.0, original_max_position_embeddings=8, beta_fast=32, beta_slow=1,
                     mscale=1.0, mscale_all_dim=1.0)
BASE = MLAShape(hidden=64, heads=4, q_lora_rank=32, kv_lora_rank=16, qk_head_dim=8,
                qk_pos_emb_head_dim=4, v_head_dim=6)
CASES = {
    "rope": BASE,
    "rope-no-q-lora": dataclasses.replace(BASE, q_lora_rank=None),
    "rope-half-split": dataclasses.replace(BASE, rope_interleave=False),  # HF's other layout
    "rope-wide-v": dataclasses.replace(BASE, v_head_dim=16),  # v wider than q and k
    "yarn": dataclasses.replace(BASE, yarn=DEEPSEEK_YARN),
    "yarn-no-q-lora": dataclasses.replace(BASE, q_lora_rank=None, yarn=DEEPSEEK_YARN),
    "yarn-mscales": dataclasses.replace(BASE, yarn={**DEEPSEEK_YARN, "mscale": 0.9,
                                                    "mscale_all_dim": 0.7}),
}
SEQ, BATCH = 24, 2  # 24 positions: past YaRN's original length of 8


def ours_vs_hf(rank: int, world_size: int) -> dict[str, float]:
    """Largest |ours - HF| per case (ours on [s, b, h], HF on [b, s, h])."""
    errors = {}
    with megatron_ranks():
        for name, shape in CASES.items():
            weights = random_weights(shape, seed=7)
            module = build_attention(shape)
            ours = weights if not shape.rope_interleave else from_interleaved_rope(
                weights, shape.heads, shape.qk_head_dim, shape.qk_pos_emb_head_dim)
            module.load_state_dict(ours, strict=True)
            x = torch.randn(BATCH, SEQ, shape.hidden, generator=torch.Generator().manual_seed(3))
            ours, _ = module(x.transpose(0, 1).contiguous())
            errors[name] = (ours.transpose(0, 1) - hf_mla(weights, x, shape)).abs().max().item()
    return errors


def test_matches_hugging_face_deepseek_v3():
    # fp32 throughout; differences are summation-order rounding (outputs are O(1)).
    errors = run_ranks(ours_vs_hf, 1)[0]
    assert errors.keys() == CASES.keys()
    assert all(e < 2e-5 for e in errors.values()), errors


def tp_run(rank: int, world_size: int, sequence_parallel: bool, case: str):
    """Output, input gradient and weight gradients (full, gathered) at this TP size."""
    shape = CASES[case]
    full = random_weights(shape, seed=11)
    x = torch.randn(SEQ, BATCH, shape.hidden, generator=torch.Generator().manual_seed(5))
    grad_out = torch.randn(SEQ, BATCH, shape.hidden, generator=torch.Generator().manual_seed(6))
    x, grad_out = x.to(device()), grad_out.to(device())  # drawn on the CPU: same on any device
    with megatron_ranks(tp=world_size):
        module = build_attention(shape, tensor_model_parallel_size=world_size,
                                 sequence_parallel=sequence_parallel).to(device())
        module.load_state_dict({k: shard(k, v, rank, world_size) for k, v in full.items()})
        local = x.chunk(world_size)[rank] if sequence_parallel else x
        local = local.clone().requires_grad_()
        out, _ = module(local)
        local_grad = grad_out.chunk(world_size)[rank] if sequence_parallel else grad_out
        out.backward(local_grad)
        grads = {n: p.grad for n, p in module.named_parameters()}
        if sequence_parallel:  # what Megatron's finalize_model_grads does for these weights
            for n, p in module.named_parameters():
                if getattr(p, "sequence_parallel", False):
                    torch.distributed.all_reduce(grads[n])
        return out.detach(), local.grad, grads


# (outputs and input gradients, weight gradients) of a TP or CP run against one rank.
TP_CP_TOLERANCES = [backend.tolerance(
    cpu=cpu, gpu=(1e-4, 1e-4),
    why="cuBLAS chooses its kernel (tiles, split-K) by matrix shape and TP/CP change the "
        "shapes, so the rounding moves further than the CPU's order of additions")
    for cpu in ((0, 1e-5), (1e-5, 1e-5))]


def gather(parts, name: str, world_size: int) -> torch.Tensor:
    if name.startswith(("linear_q_up_proj", "linear_q_proj", "linear_kv_up_proj")):
        return torch.cat(parts, dim=0)
    if name.startswith("linear_proj"):
        return torch.cat(parts, dim=1)
    return parts[0]


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2-sp"])
def test_tensor_parallel_equals_single_rank(sequence_parallel):
    case = "yarn"
    (ref_out, ref_dx, ref_grads), = run_ranks(tp_run, 1, False, case)
    ranks = run_ranks(tp_run, 2, sequence_parallel, case)
    outs = [r[0] for r in ranks]
    dxs = [r[1] for r in ranks]
    out = torch.cat(outs) if sequence_parallel else outs[0]
    dx = torch.cat(dxs) if sequence_parallel else dxs[0]
    # fp32: the TP split changes only the order of additions. Weight gradients reach ~30
    # (sums over 48 tokens), so their rounding is relative: about 1e-7 of the value.
    act, grad = TP_CP_TOLERANCES
    backend.assert_close(out, ref_out, act)
    backend.assert_close(dx, ref_dx, act)
    for name, ref in ref_grads.items():
        got = gather([r[2][name] for r in ranks], name, 2)
        backend.assert_close(got, ref, grad, msg=name)


def cp_rows(cp_rank: int, cp: int, seq: int) -> torch.Tensor:
    """The sequence positions a CP rank holds: chunks r and 2cp-1-r of 2cp (Megatron's
    get_batch_on_this_cp_rank)."""
    chunks = torch.arange(seq).chunk(2 * cp)
    return torch.cat([chunks[cp_rank], chunks[2 * cp - 1 - cp_rank]])


def cp_run(rank: int, world_size: int, tp: int, with_mask: bool):
    """Output, input gradient (this rank's rows) and weight gradients (summed over the CP
    ranks, as Megatron's data-parallel reduction over DP x CP does, and gathered over TP)
    with context parallelism world_size / tp; sequence parallelism when tp > 1."""
    from megatron.core import parallel_state

    shape = CASES["yarn"]
    full = random_weights(shape, seed=11)
    x = torch.randn(SEQ, BATCH, shape.hidden, generator=torch.Generator().manual_seed(5))
    grad_out = torch.randn(SEQ, BATCH, shape.hidden, generator=torch.Generator().manual_seed(6))
    cp = world_size // tp
    with megatron_ranks(tp=tp, cp=cp):
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        cp_rank = parallel_state.get_context_parallel_rank()
        module = build_attention(shape, tensor_model_parallel_size=tp,
                                 context_parallel_size=cp, sequence_parallel=tp > 1).to(device())
        module.load_state_dict({k: shard(k, v, tp_rank, tp) for k, v in full.items()})
        held = cp_rows(cp_rank, cp, SEQ)               # this CP rank's positions
        rows = held.chunk(tp)[tp_rank]                 # and this TP rank's part of them
        mask = None
        if with_mask:  # Megatron's: True where masked; query rows cut for CP, keys whole
            causal = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)
            mask = causal[held].expand(BATCH, 1, -1, -1).to(device())
        local = x[rows].to(device()).requires_grad_()
        out, _ = module(local, attention_mask=mask)
        out.backward(grad_out[rows].to(device()))
        grads = {n: p.grad for n, p in module.named_parameters()}
        for n, p in module.named_parameters():
            torch.distributed.all_reduce(grads[n], group=parallel_state.get_context_parallel_group())
            if getattr(p, "sequence_parallel", False):
                torch.distributed.all_reduce(
                    grads[n], group=parallel_state.get_tensor_model_parallel_group())
        return rows, out.detach(), local.grad, grads, tp_rank


@pytest.mark.parametrize("world_size,tp,with_mask", [(2, 1, False), (2, 1, True), (4, 2, False)],
                         ids=["cp2", "cp2-mask", "cp2-tp2-sp"])
def test_context_parallel_equals_single_rank(world_size, tp, with_mask):
    (_, ref_out, ref_dx, ref_grads, _), = run_ranks(cp_run, 1, 1, with_mask)
    ranks = run_ranks(cp_run, world_size, tp, with_mask, timeout=240)
    # fp32: CP changes which rank adds which tokens' contributions (order of additions),
    # as TP does above; the same bounds.
    act, grad = TP_CP_TOLERANCES
    for rows, out, dx, grads, tp_rank in ranks:
        backend.assert_close(out, ref_out[rows], act)
        backend.assert_close(dx, ref_dx[rows], act)
    for name, ref in ref_grads.items():
        parts = [grads[name] for _, _, _, grads, tp_rank in sorted(ranks, key=lambda r: r[4])
                 ][::world_size // tp]  # one per TP rank, in TP order
        backend.assert_close(gather(parts, name, tp), ref, grad, msg=name)


DEEPSEEK_LIKE = MLAShape(hidden=448, heads=8, q_lora_rank=96, kv_lora_rank=32, qk_head_dim=8,
                         qk_pos_emb_head_dim=4, v_head_dim=8, yarn=DEEPSEEK_YARN)
RECOMPUTE = {"none": [], "layernorm": ["layernorm"], "mla_up_proj": ["mla_up_proj"],
             "both": ["layernorm", "mla_up_proj"]}


def layer_grads_and_saved_bytes(rank: int, world_size: int):
    """Per recompute option: gradients of a full layer, and bytes saved for backward
    (activations only: unique storages autograd keeps, parameters excluded)."""
    from plugins.mla.recompute import SelectiveRecompute

    shape = DEEPSEEK_LIKE
    x = torch.randn(64, 2, shape.hidden, generator=torch.Generator().manual_seed(1))
    results = {}
    with megatron_ranks():
        reference_state = None
        for name, modules in RECOMPUTE.items():
            overrides = dict(recompute_granularity="selective", recompute_modules=modules) \
                if modules else {}
            layer = build_layer(shape, hidden_dropout=0.1, **overrides)
            if reference_state is None:
                reference_state = layer.state_dict()
            layer.load_state_dict(reference_state)
            params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
            kept: dict[int, int] = {}

            def ledger(t, recomputed):
                ptr = t.untyped_storage().data_ptr()
                if not recomputed and ptr not in params:
                    kept[ptr] = t.untyped_storage().nbytes()

            counting = layer.selective_recompute or SelectiveRecompute()
            counting.ledger = ledger
            inp = x.clone().requires_grad_()
            torch.manual_seed(0)  # the same dropout masks in every configuration
            with (counting if layer.selective_recompute is None else _nothing()):
                out, _ = layer(inp, attention_mask=None)
            out.backward(torch.ones_like(out))
            results[name] = (sum(kept.values()), inp.grad,
                             {n: p.grad for n, p in layer.named_parameters()})
    return results


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def test_recompute_is_bit_exact_and_saves_memory():
    results = run_ranks(layer_grads_and_saved_bytes, 1, timeout=240)[0]
    base_bytes, base_dx, base_grads = results["none"]
    for name, (saved, dx, grads) in results.items():
        assert torch.equal(dx, base_dx), name
        for param, grad in grads.items():
            assert torch.equal(grad, base_grads[param]), (name, param)
    # Each option keeps fewer bytes; both together fewer than either.
    shape = DEEPSEEK_LIKE
    qkv_bytes = 3 * 2 * shape.heads * 64 * (shape.qk_head_dim + shape.qk_pos_emb_head_dim) * 4
    norm_outputs = 64 * 2 * (2 * shape.hidden + shape.q_lora_rank + shape.kv_lora_rank) * 4
    assert base_bytes - results["mla_up_proj"][0] >= qkv_bytes  # q, k, v no longer kept
    assert base_bytes - results["layernorm"][0] >= norm_outputs  # the four norm outputs
    assert results["both"][0] < min(results["layernorm"][0], results["mla_up_proj"][0])
