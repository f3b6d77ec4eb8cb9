"""A checkpoint's FP8 KV cache scales (compressed-tensors' kv_cache_scheme, what
llm-compressor writes for an FP8 KV cache calibrated offline).

The quantization_config declares {"type": "float", "num_bits": 8, "strategy": "tensor",
"symmetric": true, "dynamic": false}, and each attention layer carries two float32 scalars,
`model.layers.{i}.self_attn.k_scale` and `v_scale`: the cache stores k / k_scale and
v / v_scale in float8_e4m3fn. vLLM then serves an fp8 cache when kv_cache_dtype is "auto"
(vllm/model_executor/layers/attention/attention.py, the kv_cache_scheme branch), and the
platform does the same (plugin/platform.py). The deprecated single `kv_scale` counts for
both. Per-head scales (strategy "attn_head"), dynamic or asymmetric schemes and other
formats are refused, naming what was found.

The layers' k_scale / v_scale fields (layers/attention.py SelfAttention, layers/mla.py's
one latent-cache k_scale) carry the values; without a declared scheme a checkpoint's
stray scale tensors are still read (as vLLM does) and used only by an fp8 cache."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np

SUPPORTED = ("kv_cache_scheme: float 8-bit, strategy tensor, symmetric, static (one k_scale "
             "and one v_scale per attention layer)")


def declares_kv_cache_scales(quantization_config: Mapping | None) -> bool:
    """Whether the checkpoint's quantization_config declares FP8 KV cache scales; a
    declared scheme we do not serve raises ValueError naming it."""
    scheme = (quantization_config or {}).get("kv_cache_scheme")
    if not scheme:
        return False
    scheme = dict(scheme)
    served = (str(scheme.get("type", "")).lower() == "float"
              and int(scheme.get("num_bits") or 0) == 8
              and str(scheme.get("strategy") or "tensor").lower() == "tensor"
              and scheme.get("symmetric", True) is not False
              and not scheme.get("dynamic", False))
    if not served:
        raise ValueError(f"checkpoint kv_cache_scheme {scheme} is not supported "
                         f"(supported: {SUPPORTED}; per-head scales are not)")
    return True


def attach_kv_cache_scales(params, tensors: Mapping[str, np.ndarray], *, required: bool):
    """`params` with each decoder layer's attention k_scale / v_scale read from the
    checkpoint (`model.layers.{i}.self_attn.`). `required` (a declared kv_cache_scheme):
    a layer without its scales fails, naming the tensor, rather than run at 1.0."""
    layers = getattr(params, "layers", None)
    if tensors is None or not layers or not hasattr(layers[0], "attn"):
        if required:
            raise ValueError("the checkpoint declares a kv_cache_scheme, but this model's "
                             "layers take no checkpoint KV cache scales")
        return params
    new_layers = [_layer_with_scales(layer, tensors, f"model.layers.{i}.self_attn.", required)
                  for i, layer in enumerate(layers)]
    return dataclasses.replace(params, layers=new_layers)


def _layer_with_scales(layer, tensors, prefix: str, required: bool):
    attn = layer.attn
    wanted = [f for f in ("k_scale", "v_scale") if hasattr(attn, f)]
    found = {f: _scale(tensors, prefix, f) for f in wanted}
    missing = [prefix + f for f, v in found.items() if v is None]
    if missing and required:
        raise ValueError(f"the checkpoint declares a kv_cache_scheme but has no tensor "
                         f"{missing[0]!r}")
    if len(missing) == len(wanted):
        return layer
    if missing:
        present = next(prefix + f for f, v in found.items() if v is not None)
        raise ValueError(f"checkpoint has {present!r} but no {missing[0]!r}: a layer's "
                         "KV cache scales come in pairs")
    return dataclasses.replace(layer, attn=dataclasses.replace(attn, **found))


def _scale(tensors, prefix: str, field: str) -> np.float32 | None:
    for name in (prefix + field, prefix + "kv_scale"):
        if name in tensors:
            return _positive_scalar(tensors[name], name)
    return None


def _positive_scalar(array, name: str) -> np.float32:
    values = np.asarray(array, np.float32).reshape(-1)
    if values.size != 1:
        raise ValueError(f"KV cache scale {name!r} has shape {tuple(np.shape(array))}; one "
                         "value per layer is served (per-head scales are not)")
    value = float(values[0])
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"KV cache scale {name!r} is {value}; it must be positive and finite")
    return np.float32(value)
