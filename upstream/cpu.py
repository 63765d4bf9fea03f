"""Run Megatron-Core 0.19.2 and `megatron.training` on CPU with gloo.

Megatron assumes a CUDA device. `install()` applies a list of narrow fixes, each naming
the upstream lines it addresses, only where CUDA is absent (or when asked with
`force=True`); on a CUDA machine it does nothing. Every fix carries a `still_needed`
probe, and a test asserts each probe, so an upgrade of megatron-core shows what can go.

Three kinds of fix, cheapest first:
- a module whose code calls `torch.cuda.*` or allocates on `device="cuda"` gets
  `CpuTorch` as its global `torch` (see `upstream.cpu_device`); the rest of the
  process keeps the real torch, and hot paths pay one attribute lookup;
- a Megatron function that only needs a different argument or a wrapper is replaced;
- a check written into a function body (`.cuda()`, `.type() == 'torch.cuda.FloatTensor'`)
  is recompiled from its upstream text with that text replaced (`rewrite_function`).
"""

from __future__ import annotations

import logging
from functools import partial, wraps

import torch

from upstream.megatron_modules import megatron_arguments, megatron_module, megatron_training
from upstream.cpu_device import CpuTorch
from upstream.patching import Fix, Patcher, Scope, apply_fixes, rewrite_function, source_has

VERSION = "megatron-core 0.19.2"
# Where CUDA is absent; `install(force=True)` applies them on a CUDA machine too (tests).
CPU_ONLY = Scope("CPU only", lambda args: cuda_is_absent())

# Modules that reach `torch.cuda` or allocate on "cuda" in the paths a GPT model takes
# through `pretrain()` (build, DDP/distributed optimizer, TP/PP schedules, checkpoints).
CUDA_CALLING_MODULES = {  # module -> where it calls CUDA (lines of its file)
    "megatron.training.training": "1150,1156 (start-time all-reduce), 1818, 4588 (data flags), "
                                  "Stream/current_stream in the loop",
    "megatron.training.initialize": "270-283 (device_count/set_device), 447 (seeds only when "
                                    "device_count > 0), 509-547 (jit warm-up on 'cuda')",
    "megatron.training.checkpointing": "get/set_rng_state, empty_cache",
    "megatron.training.models.dist_utils": "303 (_ddp_wrap: torch.cuda.Stream, the model "
                                           "building path of pretrain without a provider)",
    "megatron.training.utils.common_utils": "memory report, current_device",
    "megatron.core.utils": "get_batch_on_this_tp_rank (current_device)",
    "megatron.core.timers": "synchronize, current_device",
    "megatron.core.rerun_state_machine": "get_rng_state, tensors on current_device",
    "megatron.core.tensor_parallel.random": "303-345 (get_rng_state, manual_seed)",
    "megatron.core.tensor_parallel.mappings": "95,145,185,447 (current_device)",
    "megatron.core.tensor_parallel.layers": "647 (sequence-parallel all-gather buffer)",
    "megatron.core.pipeline_parallel.schedules": "749,1121,2292 (device='cuda')",
    "megatron.core.pipeline_parallel.p2p_communication": "211-223,334,342 (current_device), "
                                                         "263,419 (synchronize)",
    "megatron.core.optimizer.optimizer": "315,698,702,1249 (device='cuda')",
    "megatron.core.optimizer.grad_scaler": "20 (--fp16's loss scale, torch.cuda.FloatTensor)",
    "megatron.core.optimizer.clip_grads": "96,108,112,180,231 (device='cuda')",
    "megatron.core.optimizer.distrib_optimizer": "current_device",
    "megatron.core.distributed.param_and_grad_buffer": "632,1180,1186 (current_device, streams)",
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "78,162 (current_device)",
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding": "76,122,126",
    "megatron.core.transformer.utils": "39,44 (causal masks on 'cuda')",
    "megatron.core.transformer.moe.router": "184 (current_device)",
    "megatron.core.transformer.multi_token_prediction": "374-378 (MTP loss tracker on "
                                                       "current_device)",
    "megatron.core.transformer.moe.token_dispatcher": "469 (Stream), 922-925",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "current_device",
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "synchronize",
}

_CUDA_MARKERS = ("torch.cuda.", "device='cuda'", 'device="cuda"')



def _calls_cuda(name: str) -> bool:
    return source_has_any(megatron_module(name), _CUDA_MARKERS)


def source_has_any(obj, needles) -> bool:
    return any(source_has(obj, n) for n in needles)


def _proxy_fix(name: str, where: str) -> Fix:
    return Fix(
        name=f"cpu-torch:{name}",
        upstream=f"{name.replace('.', '/')}.py: {where} ({VERSION})",
        reason="calls torch.cuda or allocates on 'cuda'; sees the CPU as its device",
        still_needed=partial(_calls_cuda, name),
        apply=lambda p: p.setattr(megatron_module(name), "torch", CpuTorch()),
        scope=CPU_ONLY,
    )


# --- RNG: the CPU generator stands in for the CUDA one -------------------------------

def _apply_rng(p: Patcher) -> None:
    random = megatron_module("megatron.core.tensor_parallel.random")
    p.setattr(random, "_get_cuda_rng_state",
              lambda device=None, clone=False, graph_safe=False: torch.get_rng_state())
    p.setattr(random, "_set_cuda_rng_state",
              lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state))
    # fork() swaps the CPU generator's state in and out, which its CUDA-era check reports
    # as "CPU RNG state changed within GPU RNG context" on every call; here that is the
    # design (the forked state is the TP rank's own), so that one message is dropped.
    p.add_log_filter(logging.getLogger(random.__name__), _drop_cpu_rng_warning)


def _drop_cpu_rng_warning(record: logging.LogRecord) -> bool:
    return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _rng_needed() -> bool:
    random = megatron_module("megatron.core.tensor_parallel.random")
    return source_has(random._get_cuda_rng_state, "torch.cuda") and source_has(
        random._set_cuda_rng_state, "torch.cuda.default_generators")


# --- megatron.training entry and argument checks -------------------------------------

def _apply_allow_no_cuda(p: Patcher) -> None:
    training = megatron_training()
    initialize = megatron_module("megatron.training.initialize")
    p.setattr(training, "initialize_megatron",
              wraps(initialize.initialize_megatron)(
                  partial(initialize.initialize_megatron, allow_no_cuda=True)))


def _apply_arch_version(p: Patcher) -> None:
    # The CPU has no CUDA architecture; 0 keeps Megatron's pre-Blackwell rules
    # (e.g. CUDA_DEVICE_MAX_CONNECTIONS=1 with TP > 1).
    p.setattr(megatron_arguments(), "get_device_arch_version", lambda: 0)


# --- data iterators must not draw from the generator that dropout uses -----------------

def _apply_quiet_data_iterators(p: Patcher) -> None:
    training = megatron_training()
    build = training.build_train_valid_test_data_iterators

    @wraps(build)
    def build_without_touching_rng(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return build(*args, **kwargs)

    p.setattr(training, "build_train_valid_test_data_iterators", build_without_touching_rng)


def dataloader_draws_from_global_rng() -> bool:
    """torch's DataLoader draws its base seed from the default generator on `iter()`; on
    GPU that generator is not dropout's, on CPU it is, so a resumed run would differ."""
    loader = torch.utils.data.DataLoader(list(range(4)))
    before = torch.get_rng_state()
    iter(loader)
    return not torch.equal(before, torch.get_rng_state())


# --- checks written into function bodies ----------------------------------------------

_TYPE_STRINGS = {"'torch.cuda.FloatTensor'": "'torch.FloatTensor'",
                 "'torch.cuda.HalfTensor'": "'torch.HalfTensor'",
                 "'torch.cuda.BFloat16Tensor'": "'torch.BFloat16Tensor'"}


def _apply_get_model(p: Patcher) -> None:
    training = megatron_training()
    p.setattr(training, "get_model", rewrite_function(training, "get_model", {
        "model_module.cuda(torch.cuda.current_device())":
            "model_module.to(torch.cuda.current_device())"}))


def _apply_shared_embedding(p: Patcher) -> None:
    cls = megatron_module(
        "megatron.core.models.common.language_module.language_module").LanguageModule
    p.setattr(cls, "setup_embeddings_and_output_layer", rewrite_function(
        cls, "setup_embeddings_and_output_layer",
        {"weight.data.cuda()": "weight.data.cpu()"}))


def _apply_clip_grads(p: Patcher) -> None:
    clip_grads = megatron_module("megatron.core.optimizer.clip_grads")
    fixed = rewrite_function(clip_grads, "clip_grad_by_total_norm_fp32",
                             {"'torch.cuda.FloatTensor'": "'torch.FloatTensor'"})
    p.setattr(clip_grads, "clip_grad_by_total_norm_fp32", fixed)
    # optimizer.py:52 imported it by name.
    p.setattr(megatron_module("megatron.core.optimizer.optimizer"),
              "clip_grad_by_total_norm_fp32", fixed)


def _apply_distopt_types(p: Patcher) -> None:
    cls = megatron_module("megatron.core.optimizer.distrib_optimizer").DistributedOptimizer
    p.setattr(cls, "_build_model_and_main_param_groups",
              rewrite_function(cls, "_build_model_and_main_param_groups", _TYPE_STRINGS))
    p.setattr(cls, "__init__", rewrite_function(cls, "__init__", {
        k: v for k, v in _TYPE_STRINGS.items() if "FloatTensor'" not in k or "BFloat" in k}))


def _apply_distopt_gather(p: Patcher) -> None:
    cls = _distopt()
    p.setattr(cls, "get_parameter_state_dp_zero", rewrite_function(
        cls, "get_parameter_state_dp_zero",
        {"send_tensor = send_tensor.cuda()": "send_tensor = send_tensor.cpu()"}))


def _apply_float16_optimizer_types(p: Patcher) -> None:
    cls = _float16_optimizer()
    p.setattr(cls, "__init__", rewrite_function(cls, "__init__", _TYPE_STRINGS))


def _float16_optimizer():
    return megatron_module("megatron.core.optimizer.optimizer").Float16OptimizerWithFloat16Params


def _distopt():
    return megatron_module("megatron.core.optimizer.distrib_optimizer").DistributedOptimizer


FIXES: tuple[Fix, ...] = (
    *(_proxy_fix(name, where) for name, where in CUDA_CALLING_MODULES.items()),
    Fix("cpu-rng-tracker",
        f"megatron/core/tensor_parallel/random.py:101-172 ({VERSION})",
        "the RNG tracker saves and restores CUDA generator states; on CPU, dropout draws "
        "from the CPU generator, so the tracker forks that one (per-TP-rank dropout masks)",
        _rng_needed, _apply_rng, CPU_ONLY),
    Fix("cpu-allow-no-cuda",
        f"megatron/training/initialize.py:66, training.py:1091 ({VERSION})",
        "initialize_megatron asserts CUDA unless allow_no_cuda, which pretrain() never passes",
        lambda: source_has(megatron_module("megatron.training.initialize").initialize_megatron,
                           'assert torch.cuda.is_available(), "Megatron requires CUDA."'),
        _apply_allow_no_cuda, CPU_ONLY),
    Fix("cpu-arch-version",
        f"megatron/training/arguments.py:1414,1444,1484 ({VERSION})",
        "validate_args queries the CUDA architecture when TP > 1 or CP > 1",
        lambda: source_has(megatron_module("megatron.training.utils.common_utils")
                           .get_device_arch_version, "torch.cuda.get_device_properties"),
        _apply_arch_version, CPU_ONLY),
    Fix("cpu-data-iterators-keep-rng",
        f"megatron/training/training.py:4601 ({VERSION}) with torch.utils.data.DataLoader",
        "building the data iterators after a checkpoint's RNG state is restored draws from "
        "the CPU generator, which on CPU is dropout's: resumed runs would differ",
        dataloader_draws_from_global_rng, _apply_quiet_data_iterators, CPU_ONLY),
    Fix("cpu-get-model-to-device",
        f"megatron/training/training.py:1818 ({VERSION})",
        "get_model moves each model chunk with .cuda()",
        lambda: source_has(megatron_training().get_model,
                           "model_module.cuda(torch.cuda.current_device())"),
        _apply_get_model, CPU_ONLY),
    Fix("cpu-shared-embedding-to-device",
        f"megatron/core/models/common/language_module/language_module.py:307 ({VERSION})",
        "the embedding tied across pipeline stages is moved with .cuda() before its all-reduce",
        lambda: source_has(megatron_module("megatron.core.models.common.language_module."
                                   "language_module").LanguageModule
                           .setup_embeddings_and_output_layer, "weight.data.cuda()"),
        _apply_shared_embedding, CPU_ONLY),
    Fix("cpu-clip-grads-type",
        f"megatron/core/optimizer/clip_grads.py:174 ({VERSION})",
        "asserts every grad's type() is 'torch.cuda.FloatTensor'",
        lambda: source_has(megatron_module("megatron.core.optimizer.clip_grads")
                           .clip_grad_by_total_norm_fp32, "'torch.cuda.FloatTensor'"),
        _apply_clip_grads, CPU_ONLY),
    Fix("cpu-distopt-param-types",
        f"megatron/core/optimizer/distrib_optimizer.py:401,466,758 ({VERSION})",
        "the distributed optimizer accepts parameters only if type() names a CUDA tensor",
        lambda: source_has(_distopt()._build_model_and_main_param_groups,
                           "'torch.cuda.FloatTensor'"),
        _apply_distopt_types, CPU_ONLY),
    Fix("cpu-distopt-gather-to-device",
        f"megatron/core/optimizer/distrib_optimizer.py:1374 ({VERSION})",
        "the fully reshardable optimizer checkpoint moves each shard with .cuda() before "
        "gathering it",
        lambda: source_has(_distopt().get_parameter_state_dp_zero,
                           "send_tensor = send_tensor.cuda()"),
        _apply_distopt_gather, CPU_ONLY),
    Fix("cpu-float16-optimizer-param-types",
        f"megatron/core/optimizer/optimizer.py:973,992 ({VERSION})",
        "the --bf16/--fp16 optimizer accepts parameters only if type() names a CUDA tensor",
        lambda: source_has(_float16_optimizer().__init__, "'torch.cuda.BFloat16Tensor'"),
        _apply_float16_optimizer_types, CPU_ONLY),
)


def cuda_is_absent() -> bool:
    return not torch.cuda.is_available()


def _tensor_cuda_fails() -> bool:
    try:
        torch.zeros(1).cuda()
    except (RuntimeError, AssertionError):
        return True
    return False


def _apply_tensor_cuda_stays(p: Patcher) -> None:
    @wraps(torch.Tensor.cuda)
    def stays_on_cpu(self, device=None, non_blocking=False, **unused):
        return self

    p.setattr(torch.Tensor, "cuda", stays_on_cpu)


# Applied by `megaseek launch` only: the launch script's own code, not Megatron's.
LAUNCH_SCRIPT_FIXES: tuple[Fix, ...] = (
    Fix("cpu-launch-script-tensor-cuda",
        "Megatron-LM core_r0.19.0 pretrain_gpt.py:128 (get_batch: batch[key].cuda("
        "non_blocking=True)); torch/_tensor.py Tensor.cuda",
        "the release launch script moves each batch with .cuda(), which fails without "
        "CUDA; on a CUDA-less machine the batch stays where it is (the CPU)",
        _tensor_cuda_fails, _apply_tensor_cuda_stays,
        Scope("CPU only, megaseek launch", lambda args: cuda_is_absent())),
)


def install(force: bool = False) -> Patcher | None:
    """Applies the CPU fixes where CUDA is absent, or everywhere with `force`.

    Returns the `Patcher` (call `undo()` to restore Megatron) or None when nothing was
    applied: on a CUDA machine, or when the fixes are already in place.
    """
    if not (force or CPU_ONLY.holds(None)):
        return None
    if isinstance(megatron_training().torch, CpuTorch):
        return None
    return apply_fixes(FIXES, Patcher())


# Megatron flags a CPU run needs: gloo, and no CUDA-only fused kernels or TE modules.
CPU_ARGUMENTS = (
    ("--distributed-backend", "gloo"), ("--transformer-impl", "local"),
    ("--no-gradient-accumulation-fusion",), ("--no-bias-gelu-fusion",),
    ("--no-bias-swiglu-fusion",), ("--no-bias-dropout-fusion",),
    ("--no-masked-softmax-fusion",), ("--no-persist-layer-norm",), ("--no-rope-fusion",),
    ("--use-cpu-initialization",),
)


def given(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def with_cpu_arguments(argv: list[str]) -> list[str]:
    """Where CUDA is absent, appends the CPU_ARGUMENTS the user did not give."""
    if not cuda_is_absent():
        return argv
    return argv + [part for flag in CPU_ARGUMENTS if not given(argv, flag[0]) for part in flag]
