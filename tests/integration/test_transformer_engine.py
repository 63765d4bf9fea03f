"""`--transformer-impl` is honoured or refused: Transformer Engine where it is asked for and
installed, a start-up error naming the flag where it is not; each plugin composes with TE's
modules or refuses them by name, as its declaration (`plugins.TransformerEngine`) says, and
the docs' table (docs/launch.md) is those declarations.

Transformer Engine does not install on this machine: what runs here is the refusal, the
start-up checks, and the specs Megatron writes for TE (its spec functions run without TE,
over the stand-in classes Megatron defines when TE does not import); no TE module is built.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

import integration  # noqa: F401  (megatron.training on Python 3.11)
from plugins import Plugin, PluginError, PluginRegistry, builtin_plugins, te_policy_table
from tests.helpers import paths
from tests.helpers.plugin_args import enabled
from tests.helpers.training_runs import TINY_GPT, torchrun

TE = ["--transformer-impl", "transformer_engine"]
TE_PAGE = paths.REPO / "docs" / "launch.md"  # its Transformer Engine table
RELEASE = str(paths.RELEASE_SCRIPT)
MODEL = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
         "--seq-length", "64", "--max-position-embeddings", "64", "--micro-batch-size", "1",
         "--no-gradient-accumulation-fusion"]
MLA = ["--plugins", "mla", "--multi-latent-attention", "--kv-lora-rank", "16",
       "--qk-head-dim", "16", "--qk-pos-emb-head-dim", "8", "--v-head-dim", "16"]
DEEPSEEK_ROUTER = ["--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
                   "--moe-router-load-balancing-type", "none"]
MOE = ["--plugins", "moe", "--num-experts", "4", *DEEPSEEK_ROUTER]
FP8 = ["--plugins", "fp8", "--fp8-format", "e4m3", "--fp8-recipe", "blockwise",
       "--hidden-size", "128", "--ffn-hidden-size", "256"]
DUALPIPE = ["--plugins", "dualpipe", "--pipeline-schedule", "dualpipev",
            "--pipeline-model-parallel-size", "2", "--global-batch-size", "8",
            "--untie-embeddings-and-output-weights"]
EMA = ["--plugins", "ema", "--ema-decay", "0.9"]
BF16_MOMENTS = ["--exp-avg-dtype", "bf16", "--exp-avg-sq-dtype", "bf16"]

REFUSING = {"mla": MLA, "moe": MOE, "fp8": FP8}
COMPOSING = {"dualpipe": DUALPIPE, "ema": EMA, "bf16_moments": BF16_MOMENTS}


@pytest.fixture(autouse=True)
def two_ranks(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # DualPipeV's two pipeline ranks


def test_every_builtin_plugin_declares_what_it_does_with_transformer_engine():
    plugins = builtin_plugins()
    assert {p.name for p in plugins} == set(REFUSING) | set(COMPOSING)
    for plugin in plugins:
        assert plugin.transformer_engine is not None, plugin.name
        assert plugin.transformer_engine.composes == (plugin.name in COMPOSING), plugin.name


def test_the_docs_table_is_the_plugins_declarations():
    assert te_policy_table(builtin_plugins()) in TE_PAGE.read_text()


@pytest.mark.parametrize("name", REFUSING)
def test_a_plugin_that_does_not_compose_refuses_te_by_name(name, monkeypatch):
    with pytest.raises(PluginError) as refused:
        enabled(MODEL + REFUSING[name] + TE, monkeypatch)
    message = str(refused.value)
    assert message.startswith(f"--plugins {name} does not work with --transformer-impl "
                              "transformer_engine (Megatron's default where the flag is not "
                              "given): ")
    assert message.endswith("; pass --transformer-impl local")
    assert "\n" not in message
    # With the local modules the same configuration is accepted.
    args, plugins = enabled(MODEL + REFUSING[name] + ["--transformer-impl", "local"], monkeypatch)
    assert [p.name for p in plugins] == [name]


@pytest.mark.parametrize("name", REFUSING)
def test_megatron_default_te_is_refused_too(name, monkeypatch):
    """Through the launcher on a GPU machine the flag's default is Megatron's: TE."""
    with pytest.raises(PluginError, match=r"--transformer-impl transformer_engine \(Megatron's "
                                          r"default where the flag is not given\)"):
        enabled(MODEL + REFUSING[name], monkeypatch)


def test_the_mla_plugin_would_normalise_te_dense_layers_twice(monkeypatch):
    """Why mla refuses TE: the MLP of TE's dense layer normalises inside its fused
    layernorm-linear (no pre-MLP norm in the spec); the plugin puts its RMSNorm there."""
    import dataclasses

    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.spec_utils import ModuleSpec

    from plugins.mla.attention import RMSNorm
    from plugins.mla.spec import with_mla

    dense, _ = _te_layer_specs(monkeypatch)
    assert dense.submodules.pre_mlp_layernorm is IdentityOp
    assert dense.submodules.mlp.keywords["submodules"].linear_fc1 is not ColumnParallelLinear
    # (TE's stand-in classes cannot be deep-copied, as with_mla copies: left out.)
    norms_only = ModuleSpec(module=dense.module, submodules=dataclasses.replace(
        dense.submodules, self_attention=None, mlp=None))
    assert with_mla(norms_only).submodules.pre_mlp_layernorm is RMSNorm


@pytest.mark.parametrize("name", COMPOSING)
def test_a_plugin_that_composes_leaves_te_spec_as_megatron_wrote_it(name, monkeypatch):
    args, (plugin,) = enabled(MODEL + COMPOSING[name] + TE, monkeypatch)
    assert plugin.name == name and args.transformer_impl == "transformer_engine"
    if plugin.transform_layer_spec is None:
        return  # nothing of it reaches the spec
    for layer in _te_layer_specs(monkeypatch):
        assert plugin.transform_layer_spec(layer) is layer


@pytest.mark.parametrize("schedule", ["dualpipev", "dualpipe"])
@pytest.mark.parametrize("ranks", [2, 4])
def test_dualpipe_signals_each_chunks_first_microbatch_as_te_needs(schedule, ranks):
    """TE recasts its FP8 weight copies where Megatron's forward step is told it runs a
    chunk's first micro-batch of the step (schedules.py:490); DualPipe's executor says so
    for micro-batch 0 of each chunk (plugins/dualpipe/schedule.py, `forward`), which is
    every chunk's first forward of every step."""
    from plugins.dualpipe.program import Pipeline

    pipeline = Pipeline(schedule, ranks, Pipeline.smallest_microbatches(schedule, ranks) * 2)
    for rank in range(ranks):
        forwards = [part for cell in pipeline.program(rank) for part in cell.parts()
                    if part.op == "F"]
        for chunk in range(pipeline.chunks):
            order = [f.microbatch for f in forwards if f.chunk == chunk]
            assert order == list(range(pipeline.microbatches_per_direction)), (rank, chunk)


def test_dualpipe_with_te_refuses_megaseek_weight_gradient_deferral(monkeypatch):
    with pytest.raises(PluginError, match=r"^--transformer-impl transformer_engine is not "
                                          r"supported: .*\(given with --delay-wgrad-compute\)"):
        enabled(MODEL + DUALPIPE + TE + ["--delay-wgrad-compute"], monkeypatch)


def test_ema_refuses_te_fp8_parameters(monkeypatch):
    with pytest.raises(PluginError, match=r"^--fp8-param-gather is not supported with "
                                          r"--plugins ema: .*drop --fp8-param-gather$"):
        enabled(MODEL + EMA + TE + ["--fp8-format", "e4m3", "--fp8-param-gather",
                                    "--use-distributed-optimizer"], monkeypatch)


def test_a_plugin_without_a_declaration_refuses_te():
    registry = PluginRegistry([Plugin(name="mine", summary="declares nothing")])
    args = argparse.Namespace(plugins=["mine"], transformer_impl="transformer_engine")
    with pytest.raises(PluginError, match=r"^--plugins mine does not work with --transformer-impl "
                                          r"transformer_engine .*: it does not declare that it "
                                          r"works with Transformer Engine's modules; pass "
                                          r"--transformer-impl local$"):
        registry.plan(args)
    args.transformer_impl = "local"
    assert registry.plan(args).names == ["mine"]


# --- Transformer Engine where it is not installed -------------------------------------------

def _transformer_engine_imports() -> bool:
    from integration.transformer_engine import transformer_engine_imports

    return transformer_engine_imports()


without_te = pytest.mark.skipif("_transformer_engine_imports()",
                                reason="Transformer Engine is installed on this machine")


@without_te
@pytest.mark.parametrize("impl", ["transformer_engine", "inference_optimized"])
def test_an_implementation_needing_te_is_refused_where_te_is_absent(impl):
    from integration.transformer_engine import check_installed

    with pytest.raises(PluginError, match=rf"^--transformer-impl {impl} needs Transformer "
                                          r"Engine, which is not installed here .*: pass "
                                          r"--transformer-impl local"):
        check_installed(argparse.Namespace(transformer_impl=impl))
    check_installed(argparse.Namespace(transformer_impl="local"))


def _one_error_line(output: str) -> str:
    errors = [line for line in output.splitlines() if "megaseek: error" in line]
    assert len(errors) == 1, output[-3000:]
    assert "Traceback" not in output.split("megaseek: error")[0]
    return errors[0]


@without_te
def test_pretrain_refuses_te_on_cpu_instead_of_building_local_modules(tmp_path):
    """It trained Megatron's local modules under the flag, and exited 0."""
    done = subprocess.run([sys.executable, "-m", "integration.pretrain", *TINY_GPT, *TE,
                           "--train-iters", "3"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300, env=_one_rank_env(tmp_path))
    assert done.returncode == 2, done.stderr[-3000:]
    assert _one_error_line(done.stderr) == (
        "megaseek: error: --transformer-impl transformer_engine needs Transformer Engine, "
        "which is not installed here (`import transformer_engine` fails): pass "
        "--transformer-impl local (Megatron's own modules)")
    assert "------------------------ arguments" not in done.stdout


@without_te
@pytest.mark.slow
def test_launcher_refuses_te_on_cpu_at_start_up(tmp_path):
    with pytest.raises(AssertionError) as failed:
        torchrun(["-m", "integration.launch", RELEASE],
                 TINY_GPT + TE + ["--mock-data", "--tokenizer-type", "NullTokenizer",
                                  "--vocab-size", "128", "--train-iters", "3"],
                 tmp_path, ranks=1)
    line = _one_error_line(str(failed.value))
    assert "--transformer-impl transformer_engine needs Transformer Engine" in line
    assert line.endswith("pass --transformer-impl local (Megatron's own modules)")


def _one_rank_env(tmp_path) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return dict(env, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
                MEGASEEK_DATA_CACHE=str(tmp_path / "data"))


# --- megaseek pretrain: local unless the flag asks for TE, then TE's spec --------------------

@pytest.mark.parametrize("cuda", [False, True])
def test_pretrain_builds_local_modules_unless_te_is_given(cuda, monkeypatch):
    from integration.pretrain import with_defaults
    from upstream import cpu

    monkeypatch.setattr(cpu, "cuda_is_absent", lambda: not cuda)
    argv = with_defaults(["--mock-data"])
    assert argv.count("--transformer-impl") == 1
    assert argv[argv.index("--transformer-impl") + 1] == "local"
    argv = with_defaults(["--mock-data", *TE])
    assert argv.count("--transformer-impl") == 1
    assert argv[argv.index("--transformer-impl") + 1] == "transformer_engine"


def test_pretrain_builds_te_spec_with_te_and_local_spec_without():
    from tests.helpers.multirank import run_ranks

    ((te, local),) = run_ranks(_pretrain_specs, 1, timeout=120)
    # TE's spec: the norms are fused into TE's linears (no norm module of their own), in
    # the decoder and in the MTP layer alike; the local spec has them, and local linears.
    fused = ("IdentityOp", "IdentityOp", False)
    assert te == {"decoder": [fused, fused], "mtp": fused}
    separate = ("WrappedTorchNorm", "WrappedTorchNorm", True)
    assert local == {"decoder": [separate], "mtp": separate}


def _pretrain_specs(rank, world_size):
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_config import TransformerConfig

    from integration import gpt, transformer_engine

    found = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        _te_spec_functions(monkeypatch)
        monkeypatch.setattr(transformer_engine, "transformer_engine_imports", lambda: True)
        parallel_state.initialize_model_parallel()
        try:
            config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                                       mtp_num_layers=1, use_cpu_initialization=True)
            for impl in ("transformer_engine", "local"):
                args = argparse.Namespace(transformer_impl=impl, spec=None, num_experts=None,
                                          normalization="LayerNorm", qk_layernorm=False,
                                          multi_latent_attention=False)
                decoder, mtp = gpt.layer_specs(args, config, None)
                found.append({
                    "decoder": [_norms(layer) for layer in getattr(decoder, "layer_specs",
                                                                    [decoder])],
                    "mtp": _norms(mtp.layer_specs[0].submodules.mtp_model_layer),
                })
        finally:
            parallel_state.destroy_model_parallel()
    return found


def _norms(layer) -> tuple[str, str, bool]:
    """(input norm, pre-MLP norm, whether the QKV projection is Megatron's local linear) of
    a dense layer spec."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    parts = layer.submodules
    return (parts.input_layernorm.__name__, parts.pre_mlp_layernorm.__name__,
            parts.self_attention.submodules.linear_qkv is ColumnParallelLinear)


def _te_spec_functions(monkeypatch) -> None:
    """Megatron's GPT spec functions with their TE names bound, as where TE imports: without
    TE, Megatron still defines TE's module classes over a stand-in package
    (megatron/core/extensions/transformer_engine.py:74-85), which is all a spec needs."""
    from megatron.core.extensions import transformer_engine as te_modules
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
    from megatron.core.models.gpt import gpt_layer_specs

    for name in ("TEFusedMLP", "TEFusedMLPWithGroupedLinear", "TENorm"):
        monkeypatch.setattr(gpt_layer_specs, name, getattr(te_modules, name))
    monkeypatch.setattr(gpt_layer_specs, "TESpecProvider", TESpecProvider)


def _te_layer_specs(monkeypatch):
    """(dense layer, MoE layer) of Megatron's TE block spec for a two-layer model."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    _te_spec_functions(monkeypatch)
    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                               num_moe_experts=4, moe_layer_freq=[0, 1],
                               moe_shared_expert_intermediate_size=32, moe_ffn_hidden_size=32,
                               add_bias_linear=False, gated_linear_unit=True,
                               use_cpu_initialization=True)
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=True,
                                       normalization="RMSNorm", pp_rank=0)
    return tuple(block.layer_specs)


# --- hints that would send users without TE to TE-only flags -------------------------------

LOCAL_MOE = [*MODEL, "--transformer-impl", "local", "--num-experts", "4"]


@pytest.mark.parametrize("extra, refused", [
    (["--moe-grouped-gemm"], r"^--moe-grouped-gemm with --transformer-impl local is ignored by "
                             r"Megatron's experts .*: drop it, or use --plugins moe"),
    (["--recompute-granularity", "selective", "--recompute-modules", "moe_act"],
     r"^--recompute-modules moe_act with --transformer-impl local needs --plugins moe .*leave "
     r"moe_act out of --recompute-modules$"),
], ids=["grouped-gemm", "moe-act"])
def test_grouped_expert_flags_of_te_are_refused_on_local_modules(extra, refused, monkeypatch):
    """Megatron's local spec ignores --moe-grouped-gemm (its grouped experts are TE's), and
    its own check sent moe_act to --moe-grouped-gemm."""
    with pytest.raises(PluginError, match=refused):
        enabled(LOCAL_MOE + extra, monkeypatch)


def test_moe_act_is_honoured_by_the_moe_plugin_on_local_modules(monkeypatch):
    args, plugins = enabled(LOCAL_MOE + ["--plugins", "moe", *DEEPSEEK_ROUTER,
                                         "--recompute-granularity", "selective",
                                         "--recompute-modules", "moe_act"], monkeypatch)
    assert [p.name for p in plugins] == ["moe"]  # its experts recompute their activation


def test_bf16_moments_names_te_flags_only_where_te_is_the_optimizer():
    from plugins.bf16_moments.plugin import fused_adam_refusal
    from upstream.optimizer import fused_adam_package, torch_adam_in_use

    if torch_adam_in_use():  # neither TE nor apex installed: the plugin's own case
        assert fused_adam_package() is None
    asked = "--exp-avg-dtype bf16"
    with_te = fused_adam_refusal(asked, "transformer_engine")
    assert with_te.endswith("add --use-precision-aware-optimizer --use-distributed-optimizer")
    with_apex = fused_adam_refusal(asked, "apex")
    assert "Transformer Engine is not installed" in with_apex
    assert f"drop {asked}, or install Transformer Engine" in with_apex
