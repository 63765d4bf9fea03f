"""The linear slots `--fp8-exclude-modules` can name: Megatron's submodule names of the
linears the fp8 plugin maps (attention's, MLA's, the MLPs'), and the MoE layer's routed and
shared experts. A slot excluded keeps its module, and everything under it, in the training
dtype (`plugins.fp8.spec`)."""

EXCLUDABLE = ("linear_qkv", "linear_proj", "linear_q_proj", "linear_q_down_proj",
              "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj", "linear_fc1",
              "linear_fc2", "experts", "shared_experts")
