"""The linear slots `--fp8-exclude-modules` can name: Megatron's submodule names of the
linears the fp8 plugin maps (attention's, MLA's, the MLPs'), and the MoE layer's routed and
shared experts. A slot excluded keeps its module, and everything under it, in the training
dtype (`plugins.fp8.spec`)."""

EXCLUDABLE = ("linear_qkv", "linear_proj", "linear_q_proj", "linear_q_down_proj",
              "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj", "linear_fc1",
              "linear_fc2", "experts", "shared_experts")


def slots_of(model_chunks) -> set[str]:
    """The `EXCLUDABLE` slots a built model has: the submodules named so (in any layer,
    the MTP layers' included)."""
    return {name.rsplit(".", 1)[-1] for chunk in model_chunks
            for name, _ in chunk.named_modules()} & set(EXCLUDABLE)


def absent_slots_problem(excluded, model_chunks, group=None) -> str | None:
    """`--fp8-exclude-modules` slots that no linear of the model fills (an MLA model has no
    linear_qkv): the exclusion would keep nothing. The slots are gathered over the ranks of
    `group` (default: all, when torch.distributed is initialized), as each pipeline stage
    holds only its layers; every rank then says the same."""
    import torch.distributed as dist

    present = slots_of(model_chunks)
    if dist.is_available() and dist.is_initialized():
        gathered: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, sorted(present), group=group)
        present = set().union(*map(set, gathered))
    absent = [slot for slot in excluded if slot not in present]
    if not absent:
        return None
    return (f"--fp8-exclude-modules {' '.join(absent)}: this model has no such linear; its "
            f"slots are {', '.join(s for s in EXCLUDABLE if s in present) or 'none'}")
