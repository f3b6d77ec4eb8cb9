"""PEFT adapter directories -> host arrays, one (A, B) pair per target module.

A directory holds `adapter_config.json` (r, lora_alpha, use_rslora, target_modules,
rank_pattern, alpha_pattern) and `adapter_model.safetensors` with
`base_model.model.<module>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r]. The
scale, lora_alpha / r (or / sqrt(r) with use_rslora), is folded into B here, so the device
adds (x A^T) B^T and nothing else. What this server would serve wrongly is refused with
the config field (or weight) that asks for it."""

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

# The projections an adapter may target, by PEFT's module suffix.
SERVED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PREFIX = "base_model.model."


class LoraError(ValueError):
    """An adapter this server cannot serve; the message names the field."""


@dataclasses.dataclass
class LoraAdapter:
    name: str
    # module path ("model.layers.0.self_attn.q_proj") -> (A [r, in], B [out, r] * scale), float32
    weights: dict[str, tuple[np.ndarray, np.ndarray]]

    @property
    def max_rank(self) -> int:
        return max((a.shape[0] for a, _ in self.weights.values()), default=0)


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank/alpha_pattern: a key matches a module whose name ends with it (a regex)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _check_config(cfg: dict, path: Path) -> None:
    refusals = [
        (cfg.get("use_dora"), "use_dora: DoRA adapters are not served"),
        (cfg.get("bias", "none") != "none", f"bias={cfg.get('bias')!r}: only bias='none' is served"),
        (cfg.get("modules_to_save"), "modules_to_save: adapters that replace whole modules "
                                     "(embeddings, LM head) are not served"),
        (cfg.get("peft_type", "LORA") != "LORA", f"peft_type={cfg.get('peft_type')!r}: only LORA"),
        (cfg.get("layers_to_transform") is not None, "layers_to_transform is not served"),
        # peft's adapters on a MoE model's fused expert weights (gate_up_proj, down_proj of
        # mlp.experts): per-expert deltas inside the routed product are not built yet.
        (cfg.get("target_parameters"), f"target_parameters={cfg.get('target_parameters')}: "
                                       "MoE expert adapters are not served (attention and "
                                       "dense MLP targets are)"),
    ]
    for refused, why in refusals:
        if refused:
            raise LoraError(f"LoRA adapter {path}: adapter_config.json {why}")


def _target_names(cfg: dict) -> set[str] | None:
    targets = cfg.get("target_modules")
    if isinstance(targets, str):  # a regex over full module names: checked per weight below
        return None
    return {t.split(".")[-1] for t in targets or ()}


def load_adapter(path: str | Path, module_shapes: dict[str, tuple[int, int]], max_rank: int,
                 name: str | None = None) -> LoraAdapter:
    """Read a PEFT directory. module_shapes: the model's targetable modules (path -> [out,
    in]); an adapter weight for any other module, a shape that disagrees, or a rank above
    max_rank raises LoraError naming it."""
    path = Path(path)
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise LoraError(f"LoRA adapter {path}: no adapter_config.json")
    cfg = json.loads(config_file.read_text())
    _check_config(cfg, path)
    weights_file = path / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise LoraError(f"LoRA adapter {path}: no adapter_model.safetensors (only safetensors "
                        "weights are read)")
    tensors = load_file(str(weights_file))
    targets = _target_names(cfg)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        m = re.fullmatch(rf"{re.escape(_PREFIX)}(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise LoraError(f"LoRA adapter {path}: weight {key!r} is not a lora_A/lora_B weight "
                            "(embedding and bias adapters are not served)")
        module, which = m.groups()
        if ".experts" in module:
            raise LoraError(f"LoRA adapter {path}: weight {key!r} adapts a MoE layer's experts; "
                            "MoE expert adapters are not served (attention and dense MLP "
                            "targets are)")
        suffix = module.split(".")[-1]
        if suffix not in SERVED_MODULES or module not in module_shapes:
            raise LoraError(f"LoRA adapter {path}: target_modules includes {module!r}, which this "
                            f"model has no servable projection for (served: {SERVED_MODULES})")
        if targets is not None and suffix not in targets:
            raise LoraError(f"LoRA adapter {path}: weight {key!r} is for a module not in "
                            f"target_modules {sorted(targets)}")
        pairs.setdefault(module, {})[which] = np.asarray(value, np.float32)
    weights = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise LoraError(f"LoRA adapter {path}: {module} lacks lora_{'AB'[len(ab) and 'A' in ab]}")
        a, b = ab["A"], ab["B"]
        out, inp = module_shapes[module]
        r = a.shape[0]
        if a.shape != (r, inp) or b.shape != (out, r):
            raise LoraError(f"LoRA adapter {path}: {module} has lora_A {a.shape} and lora_B "
                            f"{b.shape}; the model's projection is [out={out}, in={inp}]")
        want_r = _pattern_value(cfg.get("rank_pattern"), module, cfg.get("r", r))
        if want_r != r:
            raise LoraError(f"LoRA adapter {path}: r (rank_pattern) says {want_r} for {module}, "
                            f"its weights have rank {r}")
        if r > max_rank:
            raise LoraError(f"LoRA adapter {path}: r={r} for {module} is above --max-lora-rank "
                            f"{max_rank}")
        alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", 8))
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        weights[module] = (a, b * np.float32(scale))
    if not weights:
        raise LoraError(f"LoRA adapter {path}: no lora_A/lora_B weights")
    return LoraAdapter(name=name or path.name, weights=weights)
