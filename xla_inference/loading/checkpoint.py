"""Opening a model: a HF directory (safetensors, single or sharded) or a GGUF file."""

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from xla_inference.loading.safetensors import (CHECKPOINT_READS, CheckpointTensors,
                                                safetensors_files)
from xla_inference.quantization.formats import reader_for
from xla_inference.quantization.formats.slicing import sliced_weight
from xla_inference.quantization.online import ONLINE_METHODS


def load_checkpoint(model_path: str | Path, gguf_file: str | None = None,
                    quantization: str | None = None, *, reads_slices: bool = False
                    ) -> tuple[dict, Mapping[str, np.ndarray]]:
    """(HF config dict, HF-named tensors) for a model directory or a .gguf file.

    A checkpoint with a `quantization_config` gets a reader for its method: the tensors
    then answer `quantized_weight(name)` with the weight's GroupQuant
    (quantization/groups.py). A method we do not serve is refused here, naming it.
    `quantization` is vLLM's method name (the checkpoint's, or --quantization); the online
    methods (quantization/online.py) need no reader: runner/build.py quantizes at load.

    `reads_slices`: an unquantized safetensors checkpoint's tensors stay unread until
    placement reads each device's slice (loading/safetensors.CheckpointSlices), also
    through a loader's transpose, axis split or part (fused MoE experts, MLA's per-head
    matrices) and stacked per expert; so do the quantized projection weights of a
    quantized checkpoint or a GGUF file (quantization/sliced.QuantSlices: each device's
    rows and columns, packed words, groups and scale rows), and quantized matrices a
    loader dequantizes to cut by head (read dequantized by block). Tensors a loader
    computes from whole (a GGUF embedding dequantized to be gathered) are read whole."""
    path = Path(model_path)
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, reads_slices)
    if gguf_file:
        return _load_gguf(path / gguf_file, reads_slices)
    if path.is_dir() and not any(path.glob("*.safetensors")):
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:  # a directory serving a GGUF (loading/default_model.py)
            return _load_gguf(ggufs[0], reads_slices)
    config = json.loads((path / "config.json").read_text())
    tensors = CheckpointTensors(safetensors_files(path), reads_slices=reads_slices)
    quant_config = config.get("quantization_config")
    if quant_config:
        return config, QuantizedCheckpoint(tensors, quantized_reader(quant_config, quantization))
    if quantization and quantization not in ONLINE_METHODS:
        raise ValueError(f"quantization {quantization!r} needs a checkpoint quantized with it, but "
                         f"{path} has no quantization_config; on an unquantized checkpoint "
                         f"--quantization takes {' or '.join(sorted(ONLINE_METHODS))} (online)")
    return config, tensors


def quantized_reader(quant_config: dict, requested: str | None = None):
    """The format reader for a checkpoint's quantization_config (read_weight(tensors,
    prefix, shape) -> GroupQuant | None); ValueError for a method or scheme we do not serve."""
    return reader_for(quant_config, requested)


class RenamedTensors(Mapping):
    """`tensors` read under the names a model's loader asks for: `source(name, tensors)` is
    the name a requested one is stored under (a multimodal checkpoint's language model under
    a prefix, say). Iteration and length are the stored tensors'."""

    def __init__(self, tensors: Mapping, source: Callable[[str, Mapping], str]):
        self.tensors = tensors
        self.source = source

    def __getitem__(self, name):
        return self.tensors[self.source(name, self.tensors)]

    def __contains__(self, name):
        return self.source(name, self.tensors) in self.tensors

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self):
        return len(self.tensors)


def language_model_source(name: str, tensors: Mapping) -> str:
    """Where a multimodal checkpoint keeps the tensor its text decoder's loader calls `name`
    (`model.*`, `lm_head.*`): the Hub's and transformers' save_pretrained say
    `language_model.model.*` and `language_model.lm_head.*`, transformers' module tree
    `model.language_model.*` (a RenamedTensors source)."""
    if name.startswith("model."):
        rest = name[len("model."):]
        candidates = ("language_model.model." + rest, "model.language_model." + rest)
    elif name.startswith("lm_head."):
        candidates = ("language_model." + name, name)
    else:
        candidates = ()
    return next((c for c in candidates if c in tensors), name)


class QuantizedCheckpoint(Mapping):
    """A quantized checkpoint's tensors: plain access as CheckpointTensors, and
    `quantized_weight("<module>.weight")` the module's GroupQuant (None where the format
    left it unquantized). From tensors that read slices (a multi-host process) the
    weight is a QuantSlices: read block by block where placement asks
    (quantization/formats/slicing.py)."""

    def __init__(self, tensors: Mapping[str, np.ndarray], reader):
        self._tensors = tensors
        self._reader = reader

    @property
    def reads_slices(self) -> bool:
        return getattr(self._tensors, "reads_slices", False)

    def quantized_weight(self, name: str):
        if not name.endswith(".weight"):
            return None
        prefix = name[:-len("weight")]
        if self.reads_slices:
            return sliced_weight(self._reader, self._tensors, prefix, CHECKPOINT_READS.add)
        return self._reader.read_weight(self._tensors, prefix, None)

    def __getitem__(self, name: str) -> np.ndarray:
        return self._tensors[name]

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def _load_gguf(path: Path, reads_slices: bool = False) -> tuple[dict, Mapping[str, np.ndarray]]:
    from xla_inference.loading.gguf import read_gguf

    metadata, tensors = read_gguf(path)
    try:
        config, hf_tensors = hf_checkpoint_from_gguf(metadata, tensors)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    if reads_slices and hasattr(hf_tensors, "reads_blocks"):
        hf_tensors.reads_blocks = True  # quantized weights read block by block (gguf.py)
    return config, hf_tensors


def _gguf_converters() -> dict:
    """GGUF architecture -> (HF config builder, HF state-dict builder)."""
    from xla_inference.loading import gguf, gguf_gemma3

    return {
        "gemma3": (gguf_gemma3.gemma3_hf_config_from_gguf, gguf_gemma3.gemma3_hf_state_dict_from_gguf),
        "llama": (gguf.llama_hf_config_from_gguf, gguf.llama_hf_state_dict_from_gguf),
    }


def hf_checkpoint_from_gguf(metadata: dict, tensors: Mapping[str, np.ndarray]
                            ) -> tuple[dict, Mapping[str, np.ndarray]]:
    """(HF config dict, HF-named float32 tensors) for a GGUF's metadata and tensors (those
    of `read_gguf`, or any mapping of GGUF names to arrays). The HF tensors are made on
    access, one at a time: a lazy `tensors` is never dequantized whole."""
    converters = _gguf_converters()
    arch = metadata.get("general.architecture")
    if arch not in converters:
        raise ValueError(f"GGUF architecture {arch!r} is not supported yet "
                         f"(supported: {', '.join(sorted(converters))})")
    make_config, make_state = converters[arch]
    config = make_config(metadata, tensors)  # (its names; llama also reads rope_freqs)
    return config, make_state(tensors, config)
