"""Hugging Face DeepSeek-V3 checkpoints in and out of megaseek's Megatron model.

    model, config = import_hf("DeepSeek-V3/")          # one CPU process, mla + moe modules
    export_hf(model, config, "out/", overwrite=False)   # config.json + safetensors shards

`megatron_flags(json.load(open("DeepSeek-V3/config.json")))` gives the same architecture
as Megatron command-line flags; `integration.hf.cli.main` is `megaseek convert`.
"""

from integration.hf.config import HFConversionError, from_hf_config, megatron_flags
from integration.hf.convert import export_hf, import_hf

__all__ = ["HFConversionError", "export_hf", "from_hf_config", "import_hf", "megatron_flags"]
