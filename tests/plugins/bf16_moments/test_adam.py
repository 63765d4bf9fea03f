"""AdamW with BF16 moments and FP32 master weights (`plugins.bf16_moments.adam`), and
Megatron's `--exp-avg-dtype bf16 --exp-avg-sq-dtype bf16` without Transformer Engine (the
`bf16_moments` plugin, `plugins.bf16_moments.plugin`, and its fixes, `upstream.optimizer`).

- The update is torch's: with FP32 moments it is bit-identical to torch.optim.AdamW / Adam.
- With BF16 moments each new moment is the round-to-nearest-even BF16 of the FP32 update
  of the stored one (checked exactly), and 20 steps stay within the bound that BF16's
  rounding allows of torch.optim.AdamW.
- Optimizer memory, master weights included, is 2/3 of torch's (8 vs 12 bytes/parameter).
- Megatron (DDP and distributed optimizer, 2 gloo ranks): trains, checkpoints BF16 moments,
  and resumes bit-exactly.
"""

from __future__ import annotations

import argparse
import io

import pytest
import torch

from plugins.bf16_moments.adam import AdamWBF16Moments, optimizer_state_bytes

BF16_UNIT_ROUNDOFF = 2.0 ** -9  # 8 significant bits: |round(x) - x| <= 2^-9 |x|


def _params(seed: int, shapes=((64, 96), (96,), (33, 7))) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


def _grads(seed: int, params, steps: int) -> list[list[torch.Tensor]]:
    """Gradients whose scale changes from step to step (1e-3 .. 10), as in training."""
    g = torch.Generator().manual_seed(seed + 1)
    return [[torch.randn(p.shape, generator=g) * 10.0 ** (-3 + (4 * i) % 5) for p in params]
            for i in range(steps)]


def _run(optimizer_cls, params, grads, lrs=None, **kwargs):
    params = [p.clone().requires_grad_() for p in params]
    optimizer = optimizer_cls(params, **kwargs)
    for i, step_grads in enumerate(grads):
        if lrs is not None:
            for group in optimizer.param_groups:
                group["lr"] = lrs[i]  # Megatron's scheduler sets the lr before each step
        for p, grad in zip(params, step_grads):
            p.grad = grad.clone()
        optimizer.step()
    return params, optimizer


# --- the update is torch's ------------------------------------------------------------

@pytest.mark.parametrize("decoupled", [True, False], ids=["adamw", "adam-l2"])
def test_fp32_moments_are_bit_identical_to_torch(decoupled):
    """Same ops in the same order as torch's single-tensor Adam: equal to the last bit."""
    params, steps = _params(0), 20
    grads = _grads(0, params, steps)
    lrs = [1e-3 * (1 - i / steps) + 1e-5 for i in range(steps)]
    reference_cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    expected, reference = _run(reference_cls, params, grads, lrs, lr=1e-3, betas=(0.9, 0.95),
                               eps=1e-8, weight_decay=0.1, foreach=False)
    got, ours = _run(AdamWBF16Moments, params, grads, lrs, lr=1e-3, betas=(0.9, 0.95),
                     eps=1e-8, weight_decay=0.1, decoupled_weight_decay=decoupled,
                     exp_avg_dtype=torch.float32, exp_avg_sq_dtype=torch.float32)
    for p_ours, p_ref in zip(got, expected):
        assert torch.equal(p_ours, p_ref)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(ours.state[p_ours][key], reference.state[p_ref][key]), key
            assert ours.state[p_ours][key].dtype == reference.state[p_ref][key].dtype


def test_bf16_moments_stay_close_to_torch_adamw():
    """Tolerances from BF16's unit roundoff u = 2^-9 over T = 20 steps (first order):
    - exp_avg_sq is a positive running sum, each step rounds it by <= u relative and the
      EMA never amplifies an old error, so its relative error is <= T*u (3.9%);
    - exp_avg is a convex combination of past gradients (|m| <= max|g|); each rounding
      adds <= u*max|g| and the EMA damps old errors by beta1, so |error| <= u*max|g|/(1-beta1);
    - each parameter step is lr*m/(sqrt(v)+eps) with |m|/sqrt(v) <~ 1 for T <= 20, so with
      the errors above every step is off by <~ lr*(10u + T*u/2) and T steps by <= 4% of
      lr*T. Measured: about 0.3% of lr*T at most, 0.05% on average."""
    params, steps, lr, (beta1, beta2) = _params(1), 20, 1e-3, (0.9, 0.999)
    grads = _grads(1, params, steps)
    expected, reference = _run(torch.optim.AdamW, params, grads, lr=lr, betas=(beta1, beta2),
                               weight_decay=0.1, foreach=False)
    got, ours = _run(AdamWBF16Moments, params, grads, lr=lr, betas=(beta1, beta2),
                     weight_decay=0.1)

    u, slack = BF16_UNIT_ROUNDOFF, 1.05  # slack: second-order terms and FP32 arithmetic
    for i, (p_ours, p_ref) in enumerate(zip(got, expected)):
        state, ref_state = ours.state[p_ours], reference.state[p_ref]
        assert p_ours.dtype == torch.float32
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
        assert state["step"].dtype == torch.float32 and state["step"].item() == steps

        max_grad = torch.stack([g[i].abs() for g in grads]).amax(0)
        m_error = (state["exp_avg"].float() - ref_state["exp_avg"]).abs()
        assert (m_error <= slack * u * max_grad / (1 - beta1)).all()
        v_error = (state["exp_avg_sq"].float() - ref_state["exp_avg_sq"]).abs()
        assert (v_error <= slack * steps * u * ref_state["exp_avg_sq"]).all()

        p_error = (p_ours - p_ref).abs()
        assert p_error.max() <= 0.04 * lr * steps
        assert p_error.max() > 0, "BF16 rounding should show in the weights"


def test_each_bf16_moment_is_the_rounded_fp32_update_of_the_stored_one():
    """One step from a BF16 state, checked exactly: the moments are upcast, updated in
    FP32, the parameter is updated with those FP32 values, and the moments are stored as
    their round-to-nearest-even BF16 values."""
    params, lr, (beta1, beta2), eps, wd = _params(2), 3e-3, (0.9, 0.95), 1e-8, 0.1
    grads = _grads(2, params, 4)
    got, ours = _run(AdamWBF16Moments, params, grads[:3], lr=lr, betas=(beta1, beta2),
                     eps=eps, weight_decay=wd)
    before = {id(p): ({k: v.clone() for k, v in ours.state[p].items()}, p.detach().clone())
              for p in got}
    for p, grad in zip(got, grads[3]):
        p.grad = grad.clone()
    ours.step()

    for p, grad in zip(got, grads[3]):
        state, param = before[id(p)]
        exp_avg = state["exp_avg"].float().lerp_(grad, 1 - beta1)
        exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        param = param.mul(1 - lr * wd)
        denom = (exp_avg_sq.sqrt() / (1 - beta2 ** 4) ** 0.5).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** 4))
        assert torch.equal(p, param)
        assert torch.equal(ours.state[p]["exp_avg"], exp_avg.to(torch.bfloat16))
        assert torch.equal(ours.state[p]["exp_avg_sq"], exp_avg_sq.to(torch.bfloat16))


def test_moments_round_half_to_even_not_truncate_or_stochastically():
    """beta1 = 0 makes exp_avg the gradient itself. 1 + 2^-8 and 1 + 3*2^-8 lie halfway
    between BF16 neighbours (spaced 2^-7 near 1): RNE gives 1 and 1 + 2^-6 (even last
    bit), truncation would give 1 and 1 + 2^-7, stochastic rounding either, at random."""
    halfway = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 3 * 2 ** -8)])
    param = torch.zeros(3, requires_grad=True)
    optimizer = AdamWBF16Moments([param], lr=1e-3, betas=(0.0, 0.999), weight_decay=0.0)
    param.grad = halfway.clone()
    optimizer.step()
    expected = torch.tensor([1.0, 1 + 2 ** -6, -(1 + 2 ** -6)], dtype=torch.bfloat16)
    assert torch.equal(optimizer.state[param]["exp_avg"], expected)


# --- memory ---------------------------------------------------------------------------

def test_state_with_master_weights_is_two_thirds_of_fp32_moments():
    """Bytes of the parameters (FP32 master weights) plus every state tensor, measured on
    the tensors: 4 + 2 + 2 against 4 + 4 + 4 bytes per parameter, plus one 4-byte step
    counter per tensor on both sides."""
    params = _params(3, shapes=((1024, 1024), (1024,), (4096,)))
    grads = _grads(3, params, 1)
    _, ours = _run(AdamWBF16Moments, params, grads, lr=1e-3)
    _, reference = _run(torch.optim.AdamW, params, grads, lr=1e-3, foreach=False)

    ours_bytes, reference_bytes = optimizer_state_bytes(ours), optimizer_state_bytes(reference)
    numel = sum(p.numel() for p in params)
    assert ours_bytes == numel * (4 + 2 + 2) + 4 * len(params)
    assert reference_bytes == numel * (4 + 4 + 4) + 4 * len(params)
    ratio = ours_bytes / reference_bytes
    assert abs(ratio - 2 / 3) < 1e-5, ratio
    # The moments alone: half.
    counters = 4 * len(params)
    assert (optimizer_state_bytes(ours, include_params=False) - counters
            == (optimizer_state_bytes(reference, include_params=False) - counters) // 2)


# --- state dicts ----------------------------------------------------------------------

def test_state_dict_round_trip_keeps_bf16_and_continues_identically():
    """torch's load_state_dict casts state to the parameters' FP32; the optimizer stores
    the moments back in BF16 (exactly), and training continues bit-identically."""
    params = _params(4)
    grads = _grads(4, params, 6)
    trained, optimizer = _run(AdamWBF16Moments, params, grads[:3], lr=1e-3)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert saved["state"][0]["exp_avg"].dtype == torch.bfloat16

    copies = [p.detach().clone().requires_grad_() for p in trained]
    restored = AdamWBF16Moments(copies, lr=1e-3)
    restored.load_state_dict(saved)
    for p, q in zip(trained, copies):
        for key in ("exp_avg", "exp_avg_sq"):
            assert restored.state[q][key].dtype == torch.bfloat16
            assert torch.equal(restored.state[q][key], optimizer.state[p][key])
    for step_grads in grads[3:]:
        for p, q, grad in zip(trained, copies, step_grads):
            p.grad, q.grad = grad.clone(), grad.clone()
        optimizer.step()
        restored.step()
    assert all(torch.equal(p, q) for p, q in zip(trained, copies))


def test_fp32_state_allocated_elsewhere_is_stored_as_bf16():
    """Megatron's own init_state_fn allocates FP32 zeros; the first step stores BF16."""
    param = torch.randn(8, requires_grad=True)
    optimizer = AdamWBF16Moments([param], lr=1e-3)
    optimizer.state[param]["exp_avg"] = torch.zeros_like(param)
    optimizer.state[param]["exp_avg_sq"] = torch.zeros_like(param)
    param.grad = torch.randn(8)
    optimizer.step()
    assert optimizer.state[param]["exp_avg"].dtype == torch.bfloat16
    assert optimizer.state[param]["exp_avg_sq"].dtype == torch.bfloat16
    assert optimizer.state[param]["step"].item() == 1


def test_refuses_what_it_does_not_do():
    with pytest.raises(ValueError, match="bfloat16 or torch.float32"):
        AdamWBF16Moments([torch.zeros(2, requires_grad=True)], exp_avg_sq_dtype=torch.float16)
    with pytest.raises(ValueError, match="capturable"):
        AdamWBF16Moments([torch.zeros(2, requires_grad=True)], capturable=True)
    bf16_param = torch.zeros(2, dtype=torch.bfloat16, requires_grad=True)
    optimizer = AdamWBF16Moments([bf16_param])
    bf16_param.grad = torch.ones_like(bf16_param)
    with pytest.raises(TypeError, match="FP32 master weights"):
        optimizer.step()


# --- Megatron, in this process ----------------------------------------------------------

def _fixes():
    from upstream.optimizer import bf16_moments_fixes

    return bf16_moments_fixes(AdamWBF16Moments)


@pytest.fixture
def bf16_moments_installed(patcher):
    from upstream.patching import apply_fixes

    return apply_fixes(_fixes(), patcher)


def _config(**kwargs):
    import integration  # noqa: F401
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(lr=1e-3, **kwargs)


def test_megatron_without_te_refuses_bf16_moments_today():
    """What megatron-core 0.19.2 does with the flags when nothing is installed: it refuses
    (it does not ignore them)."""
    from upstream.optimizer import torch_adam_in_use

    assert torch_adam_in_use(), "these tests describe a machine without TE/Apex"
    assert all(fix.still_needed() for fix in _fixes())
    with pytest.raises(AssertionError, match="exp_avg_dtype can only be fp32"):
        _config(exp_avg_dtype=torch.bfloat16, exp_avg_sq_dtype=torch.bfloat16)
    with pytest.raises(AssertionError, match="only supported with distributed optimizer"):
        _config(use_precision_aware_optimizer=True, exp_avg_dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="requires FusedAdam from TransformerEngine"):
        _config(use_precision_aware_optimizer=True, use_distributed_optimizer=True,
                exp_avg_dtype=torch.bfloat16)


def _build(config, module):
    import megatron.core.optimizer as megatron_optimizer

    return megatron_optimizer._get_megatron_optimizer_based_on_param_groups(
        config, [module], [{"params": list(module.parameters())}], skip_megatron_wrapping=True)


def test_megatron_builds_bf16_moment_adam(bf16_moments_installed):
    from upstream.patching import apply_fixes

    module = torch.nn.Linear(4, 3)
    for decoupled in (True, False):
        config = _config(exp_avg_dtype=torch.bfloat16, exp_avg_sq_dtype=torch.bfloat16,
                         weight_decay=0.1, decoupled_weight_decay=decoupled)
        optimizer, init_state_fn = _build(config, module)
        assert isinstance(optimizer, AdamWBF16Moments)
        assert optimizer.param_groups[0]["decoupled_weight_decay"] is decoupled
        assert optimizer.param_groups[0]["weight_decay"] == 0.1
        # Before a checkpoint load Megatron allocates the state: in BF16 now.
        init_state_fn(optimizer, config)
        assert {v.dtype for s in optimizer.state.values() for v in s.values()} == {torch.bfloat16}

    mixed = _config(exp_avg_dtype=torch.bfloat16)  # only the first moment in BF16
    optimizer, _ = _build(mixed, module)
    assert optimizer.moment_dtypes == {"exp_avg": torch.bfloat16, "exp_avg_sq": torch.float32}

    # FP32 moments: Megatron's own choice, unchanged.
    optimizer, _ = _build(_config(), module)
    assert type(optimizer) is torch.optim.AdamW
    optimizer, _ = _build(_config(decoupled_weight_decay=False), module)
    assert type(optimizer) is torch.optim.Adam

    assert not any(fix.still_needed() for fix in _fixes())
    changes = bf16_moments_installed.changes
    apply_fixes(_fixes(), bf16_moments_installed)  # a second install changes nothing
    assert bf16_moments_installed.changes == changes
    with pytest.raises(AssertionError, match="fp32, or bf16"):
        _config(exp_avg_dtype=torch.float16)


def test_undo_restores_megatron(bf16_moments_installed):
    import megatron.core.optimizer as megatron_optimizer

    bf16_moments_installed.undo()
    assert all(fix.still_needed() for fix in _fixes())
    assert not any(name.startswith("_megaseek") for name in vars(megatron_optimizer))
    with pytest.raises(AssertionError, match="exp_avg_dtype can only be fp32"):
        _config(exp_avg_dtype=torch.bfloat16)


def megatron_args(**overrides) -> argparse.Namespace:
    """Megatron's parsed optimizer arguments with BF16 moments asked for, and `overrides`."""
    args = dict(exp_avg_dtype=torch.bfloat16, exp_avg_sq_dtype=torch.bfloat16,
                use_precision_aware_optimizer=False, optimizer="adam",
                optimizer_cpu_offload=False, use_megatron_fsdp=False, use_torch_fsdp2=False,
                use_layer_wise_distributed_optimizer=False)
    args.update(overrides)
    return argparse.Namespace(**args)


def test_fixes_apply_exactly_where_the_flags_ask_for_them():
    """The fixes' scope (upstream.optimizer) and the plugin's check agree on every
    request the check accepts."""
    from plugins.bf16_moments.plugin import check_moment_flags, fixes

    for args in (megatron_args(), megatron_args(exp_avg_sq_dtype="fp32"),
                 megatron_args(exp_avg_dtype="fp32"),
                 megatron_args(exp_avg_dtype=torch.float32, exp_avg_sq_dtype=torch.float32)):
        needed = check_moment_flags(args)
        assert all(fix.applies(args) is needed for fix in _fixes())
        assert [fix.name for fix in fixes(args)] == (
            ["bf16-moments-adam-class", "bf16-moments-config-check"] if needed else [])


# --- Megatron's training loop, 2 gloo ranks ----------------------------------------------

BF16_MOMENTS = ["--exp-avg-dtype", "bf16", "--exp-avg-sq-dtype", "bf16"]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", [[], ["--bf16", "--use-distributed-optimizer"]],
                         ids=["ddp-fp32", "distopt-bf16"])
def test_megatron_trains_saves_bf16_moments_and_resumes_bit_exact(optimizer, tmp_path):
    """8 iterations straight vs 4 + resume from the iteration-4 checkpoint, BF16 moments:
    the loss falls, the checkpoint holds BF16 moments and FP32 master weights, and the
    resumed run's final weights, optimizer state and validation loss are identical.

    ddp-fp32: FP32 model, Megatron's FP32Optimizer (the model weights are the master
    weights; its checkpoint load goes through the rewritten init_state_fn).
    distopt-bf16: DeepSeek-V3's layout, BF16 model weights, FP32 master-weight shards and
    BF16 moments in the distributed optimizer (dp_reshardable checkpoint format)."""
    from tests.helpers.training_runs import (checkpoint_tensors, final_validation_loss, losses,
                                             pretrain)

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = optimizer + BF16_MOMENTS + ["--train-iters", "8", "--save-interval", "4"]
    out_a = pretrain(common + ["--save", str(straight)], tmp_path)
    out_b = pretrain(common + ["--save", str(resumed), "--load", str(straight),
                               "--ckpt-step", "4"], tmp_path)

    curve = losses(out_a)
    assert sorted(curve) == list(range(1, 9))
    first, last = sum(curve[i] for i in (1, 2, 3)) / 3, sum(curve[i] for i in (6, 7, 8)) / 3
    assert last < first - 0.25, f"loss did not fall: {first:.3f} -> {last:.3f}"

    a, b = checkpoint_tensors(straight, 8), checkpoint_tensors(resumed, 8)
    moments = {k: v for k, v in a.items() if ".exp_avg" in k}
    assert moments, "no optimizer moments in the checkpoint"
    assert {v.dtype for v in moments.values()} == {torch.bfloat16}
    model = {k: v for k, v in a.items() if not k.startswith("optimizer.") and v.is_floating_point()}
    if "--use-distributed-optimizer" in optimizer:
        master = {k: v for k, v in a.items() if k.startswith("optimizer.") and k.endswith(".param")}
        assert master and {v.dtype for v in master.values()} == {torch.float32}
        assert {v.dtype for v in model.values()} == {torch.bfloat16}
    else:
        assert model and {v.dtype for v in model.values()} == {torch.float32}

    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"resumed run differs in {differing[:5]}"
    assert final_validation_loss(out_a) == final_validation_loss(out_b)
    assert set(range(5, 9)) <= losses(out_b).keys()
