"""The checkpoint-state seam: plugin state saved and loaded with Megatron's checkpoint,
under its own keys ('megaseek:NAME.<key>') beside the model's and the optimizer's."""

from __future__ import annotations

import os
from functools import wraps
from typing import Any, Callable

from upstream.megatron_modules import megatron_checkpointing, megatron_training
from upstream.patching import Fix, Patcher, source_has
from upstream.seams import SEAM, VERSION


def checkpoint_state(states: Callable[[], dict[str, Any]]) -> Fix:
    """`states()[name]` (asked for when a checkpoint is saved or loaded, once the model
    exists) has `sharded_state_dict()` (saved under 'megaseek:' + name with Megatron's
    torch_dist checkpoint), `state_dict()` (plain tensors, for the other formats, which
    pickle what they save: asked for on every rank as the save begins, as only some ranks
    write a torch-format checkpoint) and `load_state_dict(state)` (given what was loaded,
    or None when the checkpoint holds nothing for it)."""

    def apply(patcher: Patcher) -> None:
        checkpointing = megatron_checkpointing()
        generate_state_dict, load_checkpoint, save_checkpoint = (
            checkpointing.generate_state_dict, checkpointing.load_checkpoint,
            checkpointing.save_checkpoint)
        loading: dict[str, Any] = {}  # while load_checkpoint runs: checkpoint keys present
        saving: dict[str, Any] = {}  # while a save in another format runs: the plain states

        @wraps(save_checkpoint)
        def save_with_plain_states(*args, **kwargs):
            from megatron.training import get_args

            if get_args().ckpt_format != "torch_dist":  # as generate_state_dict decides
                saving.update({name: state.state_dict() for name, state in states().items()})
            try:
                return save_checkpoint(*args, **kwargs)
            finally:
                saving.clear()

        @wraps(generate_state_dict)
        def with_plugin_state(args, *rest, **kwargs):
            state_dict = generate_state_dict(args, *rest, **kwargs)
            for name, state in states().items():
                if args.ckpt_format != "torch_dist":
                    state_dict[_KEY + name] = (saving[name] if name in saving
                                               else state.state_dict())
                    continue
                sharded = state.sharded_state_dict()
                if "present" in loading and not _keys(sharded) <= loading["present"]:
                    continue  # not in the checkpoint being loaded: the plugin is told so
                state_dict[_KEY + name] = sharded
            return state_dict

        @wraps(load_checkpoint)
        def load_with_plugin_state(model, *args, **kwargs):
            from megatron.training import get_args

            loading["present"] = _checkpoint_keys(get_args())
            base_load = checkpointing._load_base_checkpoint
            loaded: dict[str, Any] = {}

            @wraps(base_load)
            def keep_plugin_state(*a, **kw):
                result = base_load(*a, **kw)
                state_dict = result[0]
                if isinstance(state_dict, dict):
                    loaded.update({k: v for k, v in state_dict.items() if k.startswith(_KEY)})
                return result

            try:
                with patcher.scoped(checkpointing, "_load_base_checkpoint", keep_plugin_state):
                    result = load_checkpoint(model, *args, **kwargs)
            finally:
                loading.clear()
            for name, state in states().items():
                state.load_state_dict(loaded.get(_KEY + name))
            return result

        patcher.setattr(checkpointing, "generate_state_dict", with_plugin_state)
        patcher.setattr(checkpointing, "load_checkpoint", load_with_plugin_state)
        patcher.setattr(checkpointing, "save_checkpoint", save_with_plain_states)
        # training.py imports both by name.
        training = megatron_training()
        for attribute, replacement in (("load_checkpoint", load_with_plugin_state),):
            if hasattr(training, attribute):
                patcher.setattr(training, attribute, replacement)
        if getattr(training, "save_checkpoint", None) is save_checkpoint:
            patcher.setattr(training, "save_checkpoint", save_with_plain_states)

    return Fix(
        "seam:checkpoint-state",
        f"megatron/training/checkpointing.py:1296 generate_state_dict (save :752, load "
        f":2311/:2408; sharded for torch_dist only, :1321), :552 save_checkpoint (a torch-"
        f"format save generates it on data-parallel rank 0 alone, :737), :2066 "
        f"load_checkpoint, :1633 _load_base_checkpoint ({VERSION})",
        "save and load both build their sharded state dict in generate_state_dict; plugin "
        "state joins it under its own key and is handed back after the load",
        lambda: source_has(megatron_checkpointing().load_checkpoint, "generate_state_dict(",
                           "_load_base_checkpoint(") and
        source_has(megatron_checkpointing().generate_state_dict,
                   "if args.ckpt_format == 'torch_dist':"),
        apply, SEAM)


_KEY = "megaseek:"


def plugins_saved_in(args) -> set[str]:
    """The plugins whose state the checkpoint `args.load` names holds ('megaseek:NAME.<key>';
    none where there is no torch_dist checkpoint to read)."""
    return {key[len(_KEY):].split(".", 1)[0] for key in _checkpoint_keys(args)
            if key.startswith(_KEY)}


def _keys(sharded: Any) -> set[str]:
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    return {getattr(v, "key") for v in nested_values(sharded) if hasattr(v, "key")}


def _checkpoint_keys(args) -> set[str]:
    """The sharded keys of the checkpoint `load_checkpoint` is about to read (empty when
    there is none, or it is not a torch_dist checkpoint)."""
    from megatron.core.dist_checkpointing.core import check_is_distributed_checkpoint
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    checkpointing = megatron_checkpointing()
    load_dir = getattr(args, "load", None)
    if not load_dir:
        return set()
    tracker = checkpointing.get_checkpoint_tracker_filename(load_dir)
    if not os.path.isfile(tracker):
        return set()
    iteration, release = checkpointing.read_metadata(tracker)
    if getattr(args, "ckpt_step", None) is not None:
        iteration, release = args.ckpt_step, False
    directory = checkpointing.get_checkpoint_name(load_dir, iteration, release,
                                                  return_base_dir=True)
    if not check_is_distributed_checkpoint(directory):
        return set()
    metadata = load_sharded_metadata(directory)
    return set(metadata) | {v.key for v in metadata.values() if hasattr(v, "key")}
