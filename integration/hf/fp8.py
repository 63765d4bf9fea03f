"""DeepSeek's FP8 checkpoint weights, dequantised on the CPU.

A weight W [rows, cols] is stored as E4M3 bytes `q` with `<name>_scale_inv` [ceil(rows/128),
ceil(cols/128)] float32, one per 128x128 block (the last row and column of blocks may be
ragged): W = q * scale_inv of its block. This is the fp8 plugin's own weight format
(`plugins.common.quantize.dequantize`, 128x128 blocks); ragged edges are padded with zero
bytes (E4M3 zero) to whole blocks and cut off again.
"""

from __future__ import annotations

import math
import re

import torch

from integration.hf.config import HFConversionError
from plugins.common.quantize import dequantize, pad_to_tiles, quantize

SCALE_SUFFIX = "_scale_inv"
BLOCK = (128, 128)
QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "weight_block_size": list(BLOCK)}
# The weights DeepSeek stores in FP8: the layers' attention and MLP projections (dense,
# routed and shared experts); embedding, head, norms, router and MTP's eh_proj stay as they are.
_FP8_WEIGHT = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\..+_(proj|proj_with_mqa)\.weight")


def stored_in_fp8(hf_name: str) -> bool:
    return _FP8_WEIGHT.fullmatch(hf_name) is not None


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def dequantize_weight(name: str, q: torch.Tensor, scale_inv: torch.Tensor,
                      block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """q [rows, cols] float8_e4m3fn x its blocks' `scale_inv` -> [rows, cols] `dtype`
    (computed in fp32)."""
    if q.dtype != torch.float8_e4m3fn:
        raise HFConversionError(f"{name}: dtype {q.dtype}, expected float8_e4m3fn with "
                                f"{name}{SCALE_SUFFIX}")
    if q.dim() != 2:
        raise HFConversionError(f"{name}: FP8 weight of shape {tuple(q.shape)}, expected 2-D")
    expected = scale_shape(tuple(q.shape), block)
    if tuple(scale_inv.shape) != expected:
        raise HFConversionError(f"{name}{SCALE_SUFFIX}: shape {tuple(scale_inv.shape)}, expected "
                                f"{expected} for {tuple(q.shape)} in {block[0]}x{block[1]} blocks")
    if not scale_inv.dtype.is_floating_point or scale_inv.dtype.itemsize == 1:
        raise HFConversionError(f"{name}{SCALE_SUFFIX}: dtype {scale_inv.dtype}, expected float32")
    rows, cols = q.shape
    # E4M3's zero byte is 0.0: zero padding to whole blocks dequantises to zeros.
    padded = pad_to_tiles(q.view(torch.uint8), *block).view(torch.float8_e4m3fn)
    whole = dequantize(padded, scale_inv.float(), block, dtype=torch.float32)
    return whole[:rows, :cols].to(dtype)


def quantize_weight(weight: torch.Tensor, block: tuple[int, int]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [rows, cols] -> (E4M3 bytes [rows, cols], scale_inv [ceil(rows/128),
    ceil(cols/128)] float32), the fp8 plugin's quantisation of the zero-padded weight
    (zeros leave each block's amax alone) with the padding cut off."""
    rows, cols = weight.shape
    q, scales = quantize(pad_to_tiles(weight.float(), *block), block)
    return q[:rows, :cols].contiguous(), scales
