"""Adam(W) whose first and second moments are stored in BF16, with FP32 master weights.

The DeepSeek-V3 technical report ("Low-Precision Optimizer States") tracks the AdamW
moments in BF16 while the master weights and the gradients used by the optimizer stay in
FP32. Per parameter that is 4 (master) + 2 (`exp_avg`) + 2 (`exp_avg_sq`) = 8 bytes of
optimizer-owned memory instead of 4 + 4 + 4 = 12: two thirds.

`AdamWBF16Moments` performs exactly the update of `torch.optim.AdamW`
(`decoupled_weight_decay=True`) or `torch.optim.Adam` (`False`, L2 penalty added to the
gradient), in the same order of operations as torch's single-tensor implementation, so that
with FP32 moments it is bit-identical to torch's (the tests check this). With BF16 moments
each step upcasts the stored moments to FP32, updates them and the parameter in FP32 (the
parameter update uses the FP32 values of this step), and rounds the new moments back to
BF16 with round-to-nearest-even (`Tensor.copy_` into a BF16 tensor). The report names
no stochastic rounding and no error compensation for either moment, so there is none here:
plain RNE, the default FP32-to-BF16 conversion, for the second moment as for the first. Only one parameter's FP32 moments exist at a time, so the
transient FP32 working memory is that of the largest parameter tensor.

The state uses torch Adam's keys, `step` (a float32 scalar tensor per parameter),
`exp_avg` and `exp_avg_sq`, so code that reads or writes optimizer state by those names
(Megatron's optimizers and distributed optimizer, its checkpoints) works unchanged. Note
that `torch.optim.Optimizer.load_state_dict` casts every floating-point state tensor to its
parameter's dtype (torch/optim/optimizer.py, `_process_value_according_to_param_policy`);
this optimizer casts the moments back to their storage dtype right after loading (exact,
since the values were BF16), so a loaded state is BF16 again.

This module depends on torch only; the fixes of `upstream.optimizer`, which the plugin
applies (`plugins.bf16_moments.plugin`), make Megatron build it.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

SUPPORTED_MOMENT_DTYPES = (torch.float32, torch.bfloat16)


class AdamWBF16Moments(torch.optim.Optimizer):
    """Adam / AdamW with moments stored in `exp_avg_dtype` / `exp_avg_sq_dtype` (BF16 by
    default) and FP32 parameters (the master weights).

    Args mirror `torch.optim.AdamW`: `lr`, `betas`, `eps`, `weight_decay`, and
    `decoupled_weight_decay` (True: AdamW; False: Adam with L2 in the gradient).
    `capturable` is accepted because Megatron passes it (`--optimizer-cuda-graph`), and
    must be False.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        decoupled_weight_decay: bool = True,
        exp_avg_dtype: torch.dtype = torch.bfloat16,
        exp_avg_sq_dtype: torch.dtype = torch.bfloat16,
        capturable: bool = False,
    ) -> None:
        if isinstance(lr, torch.Tensor) or not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr} (a non-negative float)")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid betas: {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if capturable:
            raise ValueError("AdamWBF16Moments does not support capturable=True (CUDA graphs)")
        for name, dtype in (("exp_avg_dtype", exp_avg_dtype),
                            ("exp_avg_sq_dtype", exp_avg_sq_dtype)):
            if dtype not in SUPPORTED_MOMENT_DTYPES:
                raise ValueError(f"{name} must be torch.bfloat16 or torch.float32, got {dtype}")
        # Storage dtypes are attributes, not param-group entries: param groups go into
        # checkpoints, and a torch.dtype there is neither needed nor portable.
        self.moment_dtypes = {"exp_avg": exp_avg_dtype, "exp_avg_sq": exp_avg_sq_dtype}
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults)
        self.register_load_state_dict_post_hook(_moments_to_storage_dtypes)

    @property
    def exp_avg_dtype(self) -> torch.dtype:
        return self.moment_dtypes["exp_avg"]

    @property
    def exp_avg_sq_dtype(self) -> torch.dtype:
        return self.moment_dtypes["exp_avg_sq"]

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("decoupled_weight_decay", True)

    def initialize_state(self, param: torch.Tensor) -> None:
        """Zero moments in their storage dtypes (what Megatron's `init_state_fn` creates
        before loading a checkpoint into them). Like Megatron's init for torch's Adam it
        creates no `step`; `step()` adds one when missing."""
        state = self.state[param]
        for key, dtype in self.moment_dtypes.items():
            if key not in state:
                state[key] = torch.zeros_like(param, dtype=dtype,
                                              memory_format=torch.preserve_format)

    def _state_for(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        self.initialize_state(param)
        for key, dtype in self.moment_dtypes.items():
            if state[key].dtype != dtype:  # e.g. a state someone else allocated in FP32
                state[key] = state[key].to(dtype)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
            decoupled = group["decoupled_weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.dtype != torch.float32:
                    raise TypeError("AdamWBF16Moments keeps FP32 master weights: parameters "
                                    f"must be torch.float32, got {param.dtype}")
                if param.grad.is_sparse:
                    raise RuntimeError("AdamWBF16Moments does not support sparse gradients")
                grad = param.grad if param.grad.dtype == torch.float32 else param.grad.float()
                state = self._state_for(param)
                _adam_update(param, grad, state, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                             weight_decay=weight_decay, decoupled=decoupled)
        return loss


def _adam_update(param, grad, state, *, lr, beta1, beta2, eps, weight_decay, decoupled):
    """torch.optim.adam._single_tensor_adam (torch 2.13, non-capturable, non-amsgrad,
    non-maximize), op for op, with the moments upcast to FP32 around it."""
    step_t = state["step"]
    step_t += 1

    if weight_decay != 0:
        if decoupled:
            param.mul_(1 - lr * weight_decay)
        else:
            grad = grad.add(param, alpha=weight_decay)

    # `.float()` returns the stored tensor itself when it is already FP32 (in-place update,
    # as torch's); for BF16 it is an FP32 working copy, rounded back below.
    stored_avg, stored_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    exp_avg, exp_avg_sq = stored_avg.float(), stored_avg_sq.float()

    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

    step = step_t.item()
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5

    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)

    # Round to nearest even into the storage dtype (no-ops when the moments are FP32).
    if exp_avg is not stored_avg:
        stored_avg.copy_(exp_avg)
    if exp_avg_sq is not stored_avg_sq:
        stored_avg_sq.copy_(exp_avg_sq)


def _moments_to_storage_dtypes(optimizer: AdamWBF16Moments) -> None:
    """torch's load_state_dict cast the moments to the parameters' FP32; store them back
    in their storage dtypes (exact for values that were saved in those dtypes)."""
    for state in optimizer.state.values():
        for key, dtype in optimizer.moment_dtypes.items():
            value = state.get(key)
            if isinstance(value, torch.Tensor) and value.dtype != dtype:
                state[key] = value.to(dtype)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, include_params: bool = True) -> int:
    """Bytes the optimizer owns: every state tensor plus (by default) its parameters, which
    are the FP32 master weights when the optimizer runs under Megatron's mixed precision."""
    total = sum(t.nbytes for s in optimizer.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    if include_params:
        total += sum(p.nbytes for g in optimizer.param_groups for p in g["params"])
    return total
