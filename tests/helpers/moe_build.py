"""Build the moe plugin's layer from Megatron's config, with the same weights for every
configuration and expert-parallel size, on the ranks of an initialized process group
(inside `tests.helpers.mla_build.megatron_ranks`), on the rank's device
(`tests.helpers.backend.device`)."""

from __future__ import annotations

import torch

from tests.helpers.backend import device

EXPERTS, HIDDEN, FFN = 8, 64, 32


def moe_layer(ep_rank: int = 0, ep_size: int = 1, **overrides):
    """DeepSeekMoE as layer 2 of 2, in training mode, built from a TransformerConfig with
    these fields (named as Megatron's flags: it copies each flag to the config field of the
    same name). Every weight is drawn whole (all experts) from one seed, and this EP rank
    keeps its experts' slice."""
    import torch.nn.functional as F

    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
    from megatron.core.transformer import TransformerConfig

    from plugins.moe.layer import DeepSeekMoE, DeepSeekMoESubmodules

    fields = dict(num_layers=2, hidden_size=HIDDEN, num_attention_heads=4,
                  num_moe_experts=EXPERTS, moe_router_topk=2, moe_router_score_function="sigmoid",
                  moe_router_enable_expert_bias=True, moe_ffn_hidden_size=FFN,
                  moe_shared_expert_intermediate_size=FFN, add_bias_linear=False,
                  gated_linear_unit=True, activation_func=F.silu, use_cpu_initialization=True,
                  moe_router_load_balancing_type="none", expert_model_parallel_size=ep_size)
    fields.update(overrides)
    config = TransformerConfig(**fields)
    spec = get_moe_module_spec_for_backend(LocalSpecProvider(), EXPERTS)
    layer = DeepSeekMoE(config, DeepSeekMoESubmodules(spec.keywords["submodules"].shared_experts))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, weight in sorted(layer.named_parameters()):
            if getattr(weight, "allreduce", True):  # replicated
                weight.copy_(torch.randn(weight.shape, generator=g) * 0.1)
            else:  # this rank's experts of all of them
                whole = torch.randn((weight.shape[0] * ep_size, *weight.shape[1:]), generator=g)
                weight.copy_(whole.chunk(ep_size)[ep_rank] * 0.1)
    layer.set_layer_number(2)
    return layer.to(device()).train()


def tokens(seq: int = 16, batch: int = 2, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    """Hidden states [seq, batch, H] that require grad, as a layer's input does in a model."""
    x = torch.randn(seq, batch, HIDDEN, generator=torch.Generator().manual_seed(seed))
    return x.to(device(), dtype).requires_grad_()
