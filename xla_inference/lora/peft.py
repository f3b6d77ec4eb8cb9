"""PEFT adapter directories -> host arrays, one (A, B) pair per target module.

A directory holds `adapter_config.json` (r, lora_alpha, use_rslora, target_modules,
rank_pattern, alpha_pattern) and `adapter_model.safetensors` with
`base_model.model.<module>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r] (a MoE
layer's fused experts, peft's target_parameters gate_up_proj and down_proj: see
_expert_pairs). The
scale, lora_alpha / r (or / sqrt(r) with use_rslora), is folded into B here, so the device
adds (x A^T) B^T and nothing else. What this server would serve wrongly is refused with
the config field (or weight) that asks for it."""

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

# The projections an adapter may target, by PEFT's module suffix.
SERVED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                  "embed_tokens", "lm_head")
_PREFIX = "base_model.model."


class LoraError(ValueError):
    """An adapter this server cannot serve; the message names the field."""


@dataclasses.dataclass
class LoraAdapter:
    name: str
    # module path ("model.layers.0.self_attn.q_proj") -> (A [r, in], B [out, r] * scale), float32;
    # a MoE layer's experts' ("model.layers.1.mlp.experts.gate_proj"): A [E, r, in], B [E, out, r]
    weights: dict[str, tuple[np.ndarray, np.ndarray]]

    @property
    def max_rank(self) -> int:
        return max((a.shape[-2] for a, _ in self.weights.values()), default=0)


def _is_base_vocab_weight(path: Path, key: str, value, module_shapes: dict) -> bool:
    """peft saves the embedding and LM head it adapts whole (save_embedding_layers), as
    "...embed_tokens.base_layer.weight"; served when they are the base model's size (a
    resized vocabulary, new tokens' rows, is refused)."""
    m = re.fullmatch(rf"{re.escape(_PREFIX)}(.*\.?(?:embed_tokens|lm_head))\.base_layer\.weight",
                     key)
    if m is None:
        return False
    shape = module_shapes.get(m.group(1))
    want = None if shape is None else (shape[::-1] if "embed_tokens" in key else shape)
    if want is not None and tuple(value.shape) != tuple(want):
        raise LoraError(f"LoRA adapter {path}: {key} is {tuple(value.shape)}, the model's is "
                        f"{tuple(want)} (adapters that resize the vocabulary are not served)")
    return True


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
        (set(cfg.get("target_parameters") or ()) - set(EXPERT_PARAMETERS),
         f"target_parameters={cfg.get('target_parameters')}: only a MoE layer's experts' "
         f"{' and '.join(EXPERT_PARAMETERS)} are served"),
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
                 name: str | None = None, target_modules: list[str] | None = None) -> LoraAdapter:
    """Read a PEFT directory. module_shapes: the model's targetable modules (path -> [out,
    in]); an adapter weight for any other module, a shape that disagrees, or a rank above
    max_rank raises LoraError naming it. target_modules: --lora-target-modules, which left
    the other modules without stacks (named in the refusal)."""
    path = Path(path)
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise LoraError(f"LoRA adapter {path}: no adapter_config.json")
    try:
        cfg = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:  # the adapter's fault, refused as the others
        raise LoraError(f"LoRA adapter {path}: adapter_config.json is not JSON: {error}") from error
    _check_config(cfg, path)
    weights_file = path / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise LoraError(f"LoRA adapter {path}: no adapter_model.safetensors (only safetensors "
                        "weights are read)")
    try:
        tensors = load_file(str(weights_file))
    except SafetensorError as error:
        raise LoraError(f"LoRA adapter {path}: adapter_model.safetensors: {error}") from error
    targets = _target_names(cfg)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    # "...mlp.experts" -> {its file entries (itself, ".base_layer"): {"A": .., "B": ..}}
    experts: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for key, value in tensors.items():
        if _is_base_vocab_weight(path, key, value, module_shapes):
            continue  # peft's copy of the base embedding / LM head (vLLM skips it too)
        m = (re.fullmatch(rf"{re.escape(_PREFIX)}(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
             or re.fullmatch(rf"{re.escape(_PREFIX)}(.+\.embed_tokens)\.lora_embedding_([AB])",
                             key))
        if m is None:
            raise LoraError(f"LoRA adapter {path}: weight {key!r} is not a lora_A/lora_B weight "
                            "(embedding and bias adapters are not served)")
        module, which = m.groups()
        if re.search(r"\.mlp\.experts(\.base_layer)?$", module):  # target_parameters
            prefix = module.removesuffix(".base_layer")
            experts.setdefault(prefix, {}).setdefault(module, {})[which] = value
            continue
        suffix = module.split(".")[-1]
        if suffix in SERVED_MODULES and module not in module_shapes and target_modules:
            raise LoraError(_outside_deployment(path, module, target_modules))
        if suffix not in SERVED_MODULES or module not in module_shapes:
            raise LoraError(f"LoRA adapter {path}: target_modules includes {module!r}, which this "
                            f"model has no servable projection for (served: {SERVED_MODULES})")
        if targets is not None and suffix not in targets:
            raise LoraError(f"LoRA adapter {path}: weight {key!r} is for a module not in "
                            f"target_modules {sorted(targets)}")
        pairs.setdefault(module, {})[which] = np.asarray(value, np.float32)
    for prefix, found in experts.items():
        for entry in found.values():
            if set(entry) != {"A", "B"}:
                raise LoraError(f"LoRA adapter {path}: {prefix} lacks a lora_A or lora_B")
            if target_modules and f"{prefix}.down_proj" not in module_shapes:
                raise LoraError(_outside_deployment(path, prefix, target_modules))
            pairs.update(_expert_pairs(path, prefix, entry["A"], entry["B"], module_shapes))
    weights = {}
    for module, ab in pairs.items():
        if not {"A", "B"} <= set(ab):
            raise LoraError(f"LoRA adapter {path}: {module} lacks lora_{'AB'[len(ab) and 'A' in ab]}")
        a, b = ab["A"], ab["B"]
        out, inp = module_shapes[module][-2:]
        r = a.shape[-2]
        if a.shape[-2:] != (r, inp) or b.shape[-2:] != (out, r):
            raise LoraError(f"LoRA adapter {path}: {module} has lora_A {a.shape} and lora_B "
                            f"{b.shape}; the model's projection is [out={out}, in={inp}]")
        # An expert's rank and alpha are its fused parameter's (gate_up_proj, down_proj).
        named = ab.get("parameter", module)
        want_r = _pattern_value(cfg.get("rank_pattern"), named, cfg.get("r", r))
        if want_r != r:
            raise LoraError(f"LoRA adapter {path}: r (rank_pattern) says {want_r} for {module}, "
                            f"its weights have rank {r}")
        if r > max_rank:
            raise LoraError(f"LoRA adapter {path}: r={r} for {module} is above --max-lora-rank "
                            f"{max_rank}")
        alpha = _pattern_value(cfg.get("alpha_pattern"), named, cfg.get("lora_alpha", 8))
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        weights[module] = (a, b * np.float32(scale))
    if not weights:
        raise LoraError(f"LoRA adapter {path}: no lora_A/lora_B weights")
    return LoraAdapter(name=name or path.name, weights=weights)


# Families whose forward scales the embedding (and so an embedding adapter's delta, as vLLM
# does) by sqrt(hidden size); PEFT adds the delta after the scale.
_SCALED_EMBEDDING_FAMILIES = ("gemma3",)


def refuse_unserved_vocab_targets(adapter: LoraAdapter, path, *, family: str) -> None:
    """Vocabulary targets this deployment would serve wrong, refused by name: an embedding
    adapter on a family that scales its embedding (vLLM scales the adapter's delta too, PEFT
    does not). (An LM head adapter is served everywhere: speculative decoding's verify step
    and prompt logprobs score each row with its request's adapter, runner/engine.py.)"""
    if "model.embed_tokens" in adapter.weights and family in _SCALED_EMBEDDING_FAMILIES:
        raise LoraError(f"LoRA adapter {path}: it adapts embed_tokens of a {family} model, "
                        "which scales its embeddings by sqrt(hidden size); vLLM scales the "
                        "adapter's delta too while PEFT adds it unscaled, so which one is "
                        "right is ambiguous and it is not served")


def _outside_deployment(path: Path, module: str, target_modules: list[str]) -> str:
    return (f"LoRA adapter {path}: it adapts {module}, which --lora-target-modules "
            f"{sorted(target_modules)} leaves without LoRA stacks (they are allocated at "
            "start-up; a MoE layer's experts are \"experts\")")


# A MoE layer's experts as transformers (>= 5) holds them, fused over experts: gate_up_proj
# [E, 2F, D] (gate rows first) and down_proj [E, D, F]; peft adapts them as parameters.
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")


def _expert_pairs(path: Path, prefix: str, a: np.ndarray, b: np.ndarray,
                  module_shapes: dict) -> dict:
    """One of peft's adapters on a MoE layer's experts (file entries "model.layers.3.mlp.
    experts" and its ".base_layer", one per target parameter: lora_A [E*r, in] expert-major,
    lora_B [out, r*E] rank-major) -> {"<prefix>.gate_proj" and ".up_proj", or ".down_proj":
    {"A": [E, r, in], "B": [E, out, r], "parameter": the fused parameter's path}}. Which
    parameter an entry adapts is told by its shapes (in D and out 2F: gate_up_proj)."""
    gate, down = module_shapes.get(f"{prefix}.gate_proj"), module_shapes.get(f"{prefix}.down_proj")
    if gate is None or down is None:
        raise LoraError(f"LoRA adapter {path}: {prefix} adapts experts this model has no "
                        "servable MoE layer for")
    num_experts, hidden, inner = gate[0], gate[2], gate[1]
    if a.shape[0] % num_experts or b.shape[1] != a.shape[0]:
        raise LoraError(f"LoRA adapter {path}: {prefix} has lora_A {a.shape} and lora_B "
                        f"{b.shape}; the model has {num_experts} experts")
    r = a.shape[0] // num_experts
    a3 = np.asarray(a, np.float32).reshape(num_experts, r, a.shape[1])
    b3 = np.asarray(b, np.float32).reshape(b.shape[0], r, num_experts).transpose(2, 0, 1)
    if (a.shape[1], b.shape[0]) == (hidden, 2 * inner):
        parameter = f"{prefix}.gate_up_proj"
        return {f"{prefix}.gate_proj": {"A": a3, "B": b3[:, :inner], "parameter": parameter},
                f"{prefix}.up_proj": {"A": a3, "B": b3[:, inner:], "parameter": parameter}}
    if (a.shape[1], b.shape[0]) == (inner, hidden):
        return {f"{prefix}.down_proj": {"A": a3, "B": b3, "parameter": f"{prefix}.down_proj"}}
    raise LoraError(f"LoRA adapter {path}: {prefix} has lora_A {a.shape} and lora_B {b.shape}, "
                    f"neither gate_up_proj [E, {2 * inner}, {hidden}] nor down_proj "
                    f"[E, {hidden}, {inner}]")
