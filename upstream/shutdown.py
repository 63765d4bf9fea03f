"""End a Megatron run cleanly on every rank: `end_run()`, called once the training has
returned (`integration.pretrain`, `integration.launch`).

Why: Megatron's `pretrain()` returns with torch.distributed still initialised; it never
destroys the process groups it made (24 gloo groups in the demo, each with two
`pt_gloo_runloop` worker threads and a `gloo_tcp_loop` thread). A gloo worker thread lets
go of a finished collective's work, and of the tensors in it, only after the caller's
`wait()` has returned; if the Python tensor is gone by then, letting go takes the GIL.
Should the interpreter already be finalising, CPython ends that thread with
`pthread_exit`, whose forced unwind runs into the work's `noexcept` destructor:
`std::terminate`, "terminate called without an active exception", SIGABRT, after every
figure was printed. The demo's rank 1 returns from `pretrain()` a few milliseconds after
its last collectives, so on a busy machine its worker sometimes loses that race (core
dump: the worker in `~AsyncAllgatherWork` -> `decref_pyobject` -> `take_gil` ->
`pthread_exit` -> `std::terminate`, the main thread in `Py_FinalizeEx`).

So every rank waits for the others (none leaves while a peer still talks to it), then
every reference to a group is dropped and each gloo group is destroyed now, its
destructor joining its worker threads while the interpreter is fully alive. Megatron
0.19.2 needs two extra steps for that: `destroy_model_parallel()` leaves
`_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP(_GLOO)` set, and the `lru_cache` on the rotary
embeddings' `forward` keeps those modules, and the context-parallel group each holds,
alive after the model is gone.
"""

from __future__ import annotations

import functools
import gc

from upstream.megatron_modules import megatron_module
from upstream.patching import EVERY_MACHINE, Fix, patches_nothing, source_has

VERSION = "megatron-core 0.19.2"


def _leaves_groups_behind() -> bool:
    parallel_state = megatron_module("megatron.core.parallel_state")
    rotary = megatron_module("megatron.core.models.common.embeddings.rotary_pos_embedding")
    return (not source_has(parallel_state.destroy_model_parallel,
                           "_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP = None")
            or source_has(rotary.RotaryEmbedding, "@lru_cache"))


# Recorded for `megaseek fixes`; the workaround is `end_run` below.
PROCESS_GROUPS_LEFT_ALIVE = Fix(
    "end-run-destroys-every-group",
    f"megatron/training/training.py pretrain (returns with the groups up); "
    f"megatron/core/parallel_state.py:2506 destroy_model_parallel (leaves "
    f"_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP set); models/common/embeddings/"
    f"rotary_pos_embedding.py:177 (@lru_cache on forward holds the cp group) ({VERSION})",
    "gloo worker threads alive at interpreter exit abort the process (SIGABRT after "
    "training); end_run destroys every group while the interpreter is fully alive",
    _leaves_groups_behind, patches_nothing, EVERY_MACHINE)


def end_run() -> None:
    """Barrier, then destroy every process group of the run; a no-op where
    torch.distributed is not initialised (never started, or already ended)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    from megatron.core import parallel_state

    dist.barrier()
    parallel_state.destroy_model_parallel()
    for name, value in list(vars(parallel_state).items()):  # what destroy_model_parallel missed
        if isinstance(value, dist.ProcessGroup):
            setattr(parallel_state, name, None)
    for cached in gc.get_objects():  # the modules Megatron's lru_caches keep alive
        if (isinstance(cached, functools._lru_cache_wrapper)
                and getattr(cached, "__module__", "").startswith("megatron.")):
            cached.cache_clear()
    dist.destroy_process_group()
    gc.collect()  # groups held only by reference cycles (model, optimizer) go now
