"""Peak host memory of loading a torch-path model, measured in a process of its own:
`python tests/torch_models/layerwise_peak.py CHECKPOINT [--whole]` prints one JSON line:
the peak resident memory the load added (the kernel's peak count, reset just before the
load, over the resident size then),
the bytes of the placed weights, and the largest decoder layer's bytes.

Default: the layer-by-layer load (torch_models/loader.load_layerwise). --whole: the module
built and loaded whole, then placed as build_engine places it (the load before layer-by-
layer loading), for comparison.

On the CPU backend a placed array is host memory, and JAX may take a numpy array's buffer
as it is, so that placing costs nothing and the torch module's storage lives on inside the
placed arrays: host memory cannot tell the two loads apart there. As on an accelerator,
where placing copies the weights off the host, every placement here takes a copy of its
own (what a device would hold), unless --as-is: the torch side must then give its storage
back for the host to stay near one layer over what is placed.

`python tests/torch_models/layerwise_peak.py --save DIR [HIDDEN]` writes the wide Llama
checkpoint the test measures: 12 layers, 40 MB each in float32 at the default HIDDEN of
1024, half a layer per file (`DIR --fresh`: writes it, then measures). Run it with
MALLOC_MMAP_THRESHOLD_=65536, as the test does, so that glibc hands large freed blocks
back at once and resident memory counts live bytes.

Measured (12 x 40 MB, placing copies): layer by layer adds the placed 505 MB + 93 MB
(2.2 layers); whole adds 505 MB + 554 MB (13 layers)."""

import json
import resource
import sys
from pathlib import Path


def save_wide_llama(path, hidden_size: int = 1024) -> Path:
    """A random Llama checkpoint of transformers' names and shapes, written a half layer
    per file (attention, then MLP) so that writing it never holds more than that."""
    import torch
    import transformers
    from safetensors.torch import save_file

    from tests.helpers import save_word_tokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=8,
        max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False)
    config.save_pretrained(path)
    save_word_tokenizer(path, config.vocab_size)
    d, f = hidden_size, 2 * hidden_size
    generator = torch.Generator().manual_seed(0)

    def write(index: int, shapes: dict) -> None:
        tensors = {name: 0.02 * torch.randn(shape, generator=generator)
                   for name, shape in shapes.items()}
        save_file(tensors, path / f"model-{index:05d}.safetensors", metadata={"format": "pt"})

    write(0, {"model.embed_tokens.weight": (128, d), "lm_head.weight": (128, d),
              "model.norm.weight": (d,)})
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        write(2 * i + 1, {p + "input_layernorm.weight": (d,),
                          **{f"{p}self_attn.{x}_proj.weight": (d, d) for x in "qkvo"}})
        write(2 * i + 2, {p + "post_attention_layernorm.weight": (d,),
                          p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                          p + "mlp.down_proj.weight": (d, f)})
    return path


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_peak() -> bool:
    """Start the kernel's peak resident count (VmHWM) afresh, so that what the imports and
    the checkpoint's writing touched before the load cannot set the peak measured; False
    where the kernel does not allow it (then ru_maxrss, which counts from the start)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_bytes(reset: bool) -> int:
    if reset:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _layer_bytes(params, names) -> dict:
    from xla_inference.quantization.packed import host_nbytes
    from xla_inference.torch_models.layerwise import layer_of

    sizes = {}
    for name, param in zip(names, params):
        layer = layer_of(name)
        if layer is not None:
            sizes[layer] = sizes.get(layer, 0) + host_nbytes(param)
    return sizes


def _placing_copies() -> None:
    """Every placement on a buffer of its own, as a transfer to a device is."""
    import numpy as np

    from xla_inference.parallel import sharding
    from xla_inference.torch_models import layerwise

    original = sharding.place

    def place_copy(host_array, named_sharding):
        return original(np.array(host_array, copy=True), named_sharding)
    sharding.place = layerwise.place = place_copy


def measure(model_dir: str, whole: bool, as_is: bool = False) -> dict:
    import jax.numpy as jnp

    from tests.torch_models.conftest import vllm_config
    from xla_inference.parallel.sharding import build_mesh, param_shardings, place_params
    from xla_inference.quantization.packed import host_nbytes
    from xla_inference.runner.build import Precision
    from xla_inference.torch_models import loader

    if not as_is:
        _placing_copies()
    config = vllm_config(model_dir)
    precision = Precision.uniform(jnp.float32)
    mesh = build_mesh(1)
    reset = _reset_peak()
    before, peak_before = _rss_bytes(), _peak_bytes(reset)
    if whole:
        model = loader.lower(loader.build_module(config), config, precision)
        params = place_params(model.params, param_shardings(model.params, model.cfg, mesh))
        model.params = None
    else:
        model = loader.load_layerwise(config, precision, mesh)
        params = model.params
    peak = _peak_bytes(reset)
    layers = _layer_bytes(params, model.cfg.param_names)
    return {"mode": "whole" if whole else "layerwise", "placing_copies": not as_is,
            "peak_added_bytes": peak - before,
            "placed_bytes": host_nbytes(params), "layer_bytes": max(layers.values()),
            "num_layers": len(layers), "peak_reset": reset,
            "peak_set_by_load": peak > peak_before}


if __name__ == "__main__":
    if sys.argv[1] == "--save":
        save_wide_llama(sys.argv[2], *map(int, sys.argv[3:]))
        sys.exit()
    if "--fresh" in sys.argv[2:]:  # written here first (its peak is half a layer)
        save_wide_llama(sys.argv[1])
    print(json.dumps(measure(sys.argv[1], "--whole" in sys.argv[2:], "--as-is" in sys.argv[2:])))
