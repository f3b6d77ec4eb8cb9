"""Pooling checkpoints on our decoder families: an embedding model saved as the bare
decoder (`Qwen3Model`: tensors without the `model.` prefix, no LM head) and a sequence
classifier (`LlamaForSequenceClassification`: the decoder and a `score` layer [labels, D]).
Both load as the family's causal LM with the LM head tied to the embedding (it is never
used: a pooling step computes no logits); the score layer comes back on its own."""

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from xla_inference.loading.checkpoint import load_checkpoint
from xla_inference.models.interface import ModelFamily
from xla_inference.models.registry import native_family

_POOLING_SUFFIXES = ("ForSequenceClassification", "Model", "ForCausalLM")


def causal_lm_architectures(architectures: list[str] | None) -> list[str]:
    """`XForSequenceClassification` / `XModel` -> `XForCausalLM`, the family's name."""
    out = []
    for arch in architectures or []:
        for suffix in _POOLING_SUFFIXES:
            if arch.endswith(suffix):
                out.append(arch[:-len(suffix)] + "ForCausalLM")
                break
        else:
            out.append(arch)
    return out


class _Prefixed(Mapping):
    """A bare decoder's tensors under the causal LM's names (`model.` prefixed)."""

    def __init__(self, tensors: Mapping):
        self.tensors = tensors

    def _name(self, name: str) -> str:
        if name not in self.tensors and name.startswith("model."):
            return name[len("model."):]
        return name

    def __getitem__(self, name: str) -> np.ndarray:
        return self.tensors[self._name(name)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._name(name) in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def load_pooling_model(model_path: str | Path, dtype) -> tuple[ModelFamily, object, object,
                                                               np.ndarray | None]:
    """(family, config, host params, score weight [labels, D] float32 or None)."""
    refuse_extra_sentence_transformer_modules(model_path)
    hf_config, tensors = load_checkpoint(model_path)
    architectures = causal_lm_architectures(hf_config.get("architectures"))
    family = native_family(architectures)
    if family is None:
        raise ValueError(f"xla-inference has no native JAX family for pooling model "
                         f"{hf_config.get('architectures')}")
    tensors = _Prefixed(tensors)
    names = set(tensors.tensors)
    hf_config = dict(hf_config, architectures=architectures)
    if "lm_head.weight" not in names:
        hf_config["tie_word_embeddings"] = True  # an unused head; shares the embedding
    cfg = family.config_from_hf(hf_config)
    params = family.load_params(tensors, cfg, dtype)
    score = None
    if "score.weight" in names:
        score = np.asarray(tensors["score.weight"], np.float32)
    return family, cfg, params, score


# sentence-transformers modules the pooling runner reproduces (the decoder, its pooling and
# normalization); any other module (a Dense projector, ...) changes the embedding.
_SERVED_ST_MODULES = ("Transformer", "Pooling", "Normalize")


def refuse_extra_sentence_transformer_modules(model_path: str | Path) -> None:
    """A sentence-transformers checkpoint lists its modules in modules.json; one we do not
    run would be silently skipped (a wrong embedding), so it is refused by name."""
    modules_file = Path(model_path) / "modules.json"
    if not modules_file.is_file():
        return
    for module in json.loads(modules_file.read_text()):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind not in _SERVED_ST_MODULES:
            raise ValueError(f"xla-inference does not serve the sentence-transformers module "
                             f"{module.get('type')!r} ({module.get('path')!r} in modules.json) "
                             f"yet: only {', '.join(_SERVED_ST_MODULES)}")


def read_config(model_path: str | Path) -> dict:
    return json.loads((Path(model_path) / "config.json").read_text())
