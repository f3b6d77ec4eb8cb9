"""Online quantization of an unquantized checkpoint at load (--quantization int8 / fp8):
each projection weight quantized per output channel, symmetric, as vLLM's online FP8
does (one scale per channel: a row's largest magnitude maps to the format's largest
value). Activations stay in floating point (weight-only), so any family runs it."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from xla_inference.quantization.groups import FP8, INT8, GroupQuant

ONLINE_METHODS = {"int8": INT8, "fp8": FP8}
_FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448


def quantize_per_channel(weight: np.ndarray, kind: str) -> GroupQuant:
    """A float [out, in] weight -> GroupQuant of `kind` (INT8 or FP8), one scale per row."""
    w = np.asarray(weight, np.float32)
    peak = np.max(np.abs(w), axis=1, keepdims=True)
    levels = 127.0 if kind == INT8 else _FP8_MAX
    scales = np.where(peak > 0, peak / levels, 1.0).astype(np.float32)
    if kind == INT8:
        values = np.clip(np.rint(w / scales), -127, 127).astype(np.int8)
    elif kind == FP8:
        values = np.clip(w / scales, -_FP8_MAX, _FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
    else:
        raise ValueError(f"online quantization to {kind!r} is not supported "
                         f"(supported: {', '.join(sorted(ONLINE_METHODS))})")
    return GroupQuant(values, scales, None, kind, group_size=w.shape[1])
