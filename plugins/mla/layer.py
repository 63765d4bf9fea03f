"""Megatron's TransformerLayer with MLA's selective recomputation.

`--recompute-granularity selective --recompute-modules layernorm mla_up_proj` are
Megatron's names. Megatron 0.19.2 implements 'layernorm' with a storage-sharing C++
extension and a Transformer-Engine-only path (without TE it fails; see
shared notes), so this layer turns Megatron's own flags for it off and recomputes through
saved-tensor hooks instead (`plugins.mla.recompute`):
- layernorm: the outputs of the input, pre-MLP and latent RMSNorms;
- mla_up_proj: the query, key and value the up-projections (with RoPE) produce, which
  attention saves; recomputed from the small latents.
"""

from __future__ import annotations

import copy

from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_layer import TransformerLayer

from plugins.mla.recompute import SelectiveRecompute

RECOMPUTE_MODULES = ("layernorm", "mla_up_proj")


class MLATransformerLayer(TransformerLayer):
    def __init__(self, config, *args, **kwargs):
        chosen = set(config.recompute_modules or ()) if (
            config.recompute_granularity == "selective") else set()
        if "layernorm" in chosen:
            # Megatron's own layernorm recompute (CheckpointWithoutOutput) is replaced
            # below; with FP8 its set-up also reaches for Transformer Engine
            # (transformer_layer.py:452-511, megatron-core 0.19.2). So Megatron builds
            # this layer from a view of the config without 'layernorm'.
            config = copy.copy(config)
            config.recompute_modules = [m for m in config.recompute_modules if m != "layernorm"]
        super().__init__(config, *args, **kwargs)
        self.recompute_input_layernorm = self.recompute_pre_mlp_layernorm = False
        self.selective_recompute = None
        if not chosen & set(RECOMPUTE_MODULES):
            return
        self.selective_recompute = SelectiveRecompute()
        attention = self.self_attention
        if "layernorm" in chosen:
            norms = [self.input_layernorm, self.pre_mlp_layernorm,
                     getattr(attention, "q_layernorm", None), attention.kv_layernorm]
            self.selective_recompute.track(
                n for n in norms if n is not None and not isinstance(n, IdentityOp))
        if "mla_up_proj" in chosen:
            attention.up_projection_recompute = self.selective_recompute

    def forward(self, *args, **kwargs):
        if self.selective_recompute is None:
            return super().forward(*args, **kwargs)
        with self.selective_recompute:
            return super().forward(*args, **kwargs)
