"""The process groups a module uses: those Megatron passes in, else parallel_state's."""

from __future__ import annotations


def process_groups(pg_collection, names: tuple[str, ...]):
    """`pg_collection` as Megatron passes it to a layer's submodules; without one (a module
    built outside a Megatron model), the groups `names` (ProcessGroupCollection's fields:
    "ep", "tp_cp", ...) of Megatron's initialized parallel_state."""
    if pg_collection is not None:
        return pg_collection
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups(required_pgs=list(names))
