"""`hf-to-megatron` at a parallel layout: one gloo process per rank on the CPU.

Each of the T*P*E ranks sets up Megatron's parallel state at those sizes (expert tensor
parallel size 1), builds only its part of the model on the meta device (its pipeline
stage's layers, its tensor-parallel slices, its expert-parallel experts:
`convert.build_model`, as Megatron's builder does for a stage), and all ranks save
together with `dist_checkpointing.save`, each parameter made from the Hugging Face tensors
it needs, sliced, only as it is written (`convert.save_megatron` with the rank's
`convert.Part`): a rank holds one parameter and one mapped shard at a time. Megatron's
sharded state dict makes the checkpoint independent of the layout it was written at.

    ranks = Layout(tensor=2, pipeline=1, expert=2)
    check_layout(ranks, hf, mtp_layers=1)                 # before anything is written
    convert_on_ranks(ranks, source, release_dir, overrides)
"""

from __future__ import annotations

import dataclasses
import os
import resource
import tempfile
from pathlib import Path
from typing import Any

from integration.hf.config import HFConversionError, HFModel

# More processes than this on one machine is a mistake, not a conversion.
MAX_RANKS = 64
# The launcher's --pipeline-schedule names; all but 1f1b are refused (`check_layout`).
SCHEDULES = ("1f1b", "dualpipe", "dualpipev")
TP_FLAG = "--tensor-model-parallel-size"
PP_FLAG = "--pipeline-model-parallel-size"
EP_FLAG = "--expert-model-parallel-size"


@dataclasses.dataclass(frozen=True)
class Layout:
    tensor: int = 1
    pipeline: int = 1
    expert: int = 1

    @property
    def ranks(self) -> int:
        return self.tensor * self.pipeline * self.expert


def check_layout(layout: Layout, hf: HFModel, mtp_layers: int,
                 schedule: str = "1f1b") -> None:
    """Raises naming the flag when the model (with `mtp_layers` MTP depths) does not split
    at `layout`, or `schedule` is not 1f1b; before any process starts or anything is
    written."""
    if schedule != "1f1b":
        raise HFConversionError(
            f"--pipeline-schedule {schedule} is not supported by hf-to-megatron: the "
            "checkpoint does not depend on the schedule (Megatron's sharded checkpoint "
            "loads under --pipeline-schedule dualpipev or dualpipe at any layout); leave the "
            "flag out or pass 1f1b")
    for flag, size in ((TP_FLAG, layout.tensor), (PP_FLAG, layout.pipeline),
                       (EP_FLAG, layout.expert)):
        if size < 1:
            raise HFConversionError(f"{flag} {size}: must be at least 1")
    if layout.ranks > MAX_RANKS:
        raise HFConversionError(
            f"{TP_FLAG} {layout.tensor} x {PP_FLAG} {layout.pipeline} x {EP_FLAG} "
            f"{layout.expert} = {layout.ranks} processes; at most {MAX_RANKS} on one machine")
    _check_tensor_split(layout.tensor, hf, mtp_layers)
    _check_expert_split(layout.expert, hf)
    _check_pipeline_split(layout.pipeline, hf)


def _check_tensor_split(size: int, hf: HFModel, mtp_layers: int) -> None:
    split = {"num_attention_heads": hf.num_attention_heads, "vocab_size": hf.vocab_size}
    if mtp_layers:
        split["hidden_size (MTP eh_proj)"] = hf.hidden_size
    if not hf.n_routed_experts or hf.first_k_dense_replace:
        split["intermediate_size"] = hf.intermediate_size
    if hf.n_routed_experts and hf.n_shared_experts:
        split["n_shared_experts * moe_intermediate_size"] = (hf.n_shared_experts
                                                             * hf.moe_intermediate_size)
    for field, value in split.items():
        if value % size:
            raise HFConversionError(f"{TP_FLAG} {size}: does not divide the model's {field} "
                                    f"({value})")


def _check_expert_split(size: int, hf: HFModel) -> None:
    if size == 1:
        return
    if not hf.n_routed_experts:
        raise HFConversionError(f"{EP_FLAG} {size}: the model has no routed experts")
    if hf.n_routed_experts % size:
        raise HFConversionError(f"{EP_FLAG} {size}: does not divide the model's "
                                f"n_routed_experts ({hf.n_routed_experts})")


def _check_pipeline_split(size: int, hf: HFModel) -> None:
    if hf.num_hidden_layers % size:  # Megatron's even split of the decoder layers
        raise HFConversionError(f"{PP_FLAG} {size}: does not divide the model's "
                                f"num_hidden_layers ({hf.num_hidden_layers})")


def convert_on_ranks(layout: Layout, source: Path, release: Path,
                     overrides: dict[str, Any]) -> None:
    """Writes the Megatron checkpoint of HF folder `source` into `release` from
    `layout.ranks` spawned processes; raises HFConversionError naming the first rank that
    failed."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="megaseek-convert-") as tmp:
        store = os.path.join(tmp, "store")
        try:
            mp.start_processes(_rank_main, nprocs=layout.ranks, join=True,
                               start_method="spawn",
                               args=(layout, store, str(source), str(release), overrides))
        except mp.ProcessRaisedException as e:
            raise HFConversionError(f"rank {e.error_index}: {_reason(str(e))}") from None
        except mp.ProcessExitedException as e:
            raise HFConversionError(f"rank {e.error_index} exited with code {e.exit_code}") \
                from None


def _reason(traceback_text: str) -> str:
    """A rank's HFConversionError as its message alone; any other failure in full."""
    lines = [line for line in traceback_text.strip().splitlines() if line.strip()]
    marker = "HFConversionError: "
    if lines and marker in lines[-1]:
        return lines[-1].split(marker, 1)[1]
    return traceback_text.strip()


def _rank_main(rank: int, layout: Layout, store: str, source: str, release: str,
               overrides: dict[str, Any]) -> None:
    """One rank: its part of the model, made from the HF folder as it is saved with the
    rest (`convert.save_megatron`)."""
    import torch
    import torch.distributed as dist

    import integration  # noqa: F401  (Megatron importable on Python 3.11)
    from megatron.core import parallel_state, tensor_parallel

    from integration.hf import convert
    from upstream import cpu

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // layout.ranks))
    dist.init_process_group("gloo", store=dist.FileStore(store, layout.ranks), rank=rank,
                            world_size=layout.ranks)
    cpu.install(force=True)  # the model is on the CPU, whatever the machine has
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor, pipeline_model_parallel_size=layout.pipeline,
        expert_model_parallel_size=layout.expert, expert_tensor_parallel_size=1)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    convert.save_megatron(Path(source), Path(release), overrides,
                          part_of=lambda model, hf: _part(model, hf, layout),
                          tensor_model_parallel_size=layout.tensor,
                          pipeline_model_parallel_size=layout.pipeline,
                          expert_model_parallel_size=layout.expert,
                          expert_tensor_parallel_size=1)
    print(f"megaseek convert: rank {rank} of {layout.ranks}: peak RSS {peak_rss_mib():.0f} MiB",
          flush=True)
    dist.destroy_process_group()


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB: Linux's VmHWM, which starts
    afresh with the program (ru_maxrss carries the peak of the process it was forked
    from over exec), else ru_maxrss."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _part(model, hf: HFModel, layout: Layout):
    """This rank's `convert.Part`, from Megatron's parallel state and the built model."""
    from megatron.core import parallel_state

    from integration.hf.convert import Part

    experts = None
    if hf.n_routed_experts:
        local = hf.n_routed_experts // layout.expert
        first = parallel_state.get_expert_model_parallel_rank() * local
        experts = range(first, first + local)
    layers = None
    if layout.pipeline > 1:  # Megatron numbers a stage's layers from 1 in the whole model
        layers = {layer.layer_number - 1: i for i, layer in enumerate(model.decoder.layers)}
    return Part(tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                tp_size=layout.tensor, experts=experts, layers=layers)
