"""Building an engine, in vLLM's two phases: load the weights (`load`), then, once the KV
cache's size is known, allocate it, place the weights on the mesh and compile
(`build_engine`, then `ModelEngine.warm_up`). The worker (plugin/worker.py), the tests and
the benchmarks all build through here."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp

from xla_inference.loading.params import narrow_projections, pack_quantized
from xla_inference.lora.slots import LoraSlots, decoder_targets, restrict_targets
from xla_inference.models.interface import KvLayer, ModelFamily
from xla_inference.models.loader import load_model
from xla_inference.parallel.sharding import build_mesh
from xla_inference.quantization.packed import host_nbytes
from xla_inference.runner.engine import EngineConfig, ModelEngine


@dataclasses.dataclass(frozen=True)
class Precision:
    """The precision policy, named once: the dtype of the projection matrices (what
    layers/linear.project multiplies), of everything else the model holds and computes
    (embeddings, norms, the residual stream, attention, MoE experts, MLA), and of the KV
    cache."""

    weights: jnp.dtype
    activations: jnp.dtype
    kv_cache: jnp.dtype

    @classmethod
    def uniform(cls, dtype) -> Precision:
        dtype = jnp.dtype(dtype)
        return cls(dtype, dtype, dtype)

    @classmethod
    def for_platform(cls, dtype, platform: str) -> Precision:
        """vLLM's model dtype on a JAX platform. On the host CPU a 16-bit dtype means 16-bit
        projection matrices, whose products take 16-bit inputs and accumulate in float32,
        float32 for the rest (XLA's CPU backend runs those products on its bfloat16 kernels,
        twice float32's rate with avx512_bf16, a batch-1 step reading half the bytes, but is
        slow at 16-bit elementwise work), and the KV cache of cpu_kv_cache_dtype().
        Accelerators run the dtype throughout."""
        dtype = jnp.dtype(dtype)
        if platform == "cpu" and dtype.itemsize < 4:
            return cls(dtype, jnp.dtype(jnp.float32), cpu_kv_cache_dtype())
        return cls.uniform(dtype)

    def with_kv_cache(self, cache_dtype: str, platform: str | None = None) -> Precision:
        """This policy with vLLM's --kv-cache-dtype: "auto" keeps the cache dtype above;
        "fp8" (= "fp8_e4m3") and "fp8_e5m2" store the cache in that fp8 format on every
        platform (kernels/ragged_paged_attention.py: values / scale, read as float32).
        "bfloat16" / "float16": served where "auto" gives that dtype anyway, and "bfloat16"
        on the CPU whatever the model dtype (the native kernel reads it; untested with
        float32 activations on the accelerators' kernels, so refused there); the CPU keeps
        a 16-bit cache as bfloat16, never float16 (cpu_kv_cache_dtype)."""
        if cache_dtype == "auto":
            return self
        if cache_dtype in ("bfloat16", "float16"):
            named = jnp.dtype(cache_dtype)
            if named == self.kv_cache:
                return self
            if named == jnp.bfloat16 and platform == "cpu":
                return dataclasses.replace(self, kv_cache=named)
            raise ValueError(f"kv_cache_dtype {cache_dtype!r} is not served with this model "
                             f"dtype on {platform}: 'auto' stores a {self.kv_cache.name} cache "
                             "here, and the CPU stores 16-bit caches as bfloat16 only")
        if cache_dtype not in FP8_KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype {cache_dtype!r} is not served; the choices are "
                             f"auto, bfloat16, {', '.join(FP8_KV_CACHE_DTYPES)}")
        return dataclasses.replace(self, kv_cache=jnp.dtype(FP8_KV_CACHE_DTYPES[cache_dtype]))

    @property
    def narrows_projections(self) -> bool:
        return self.weights != self.activations


def cpu_kv_cache_dtype() -> jnp.dtype:
    """The KV cache of a 16-bit model on the host CPU: bfloat16 where the native attention
    kernel serves this process (it widens bfloat16 to float32 in registers as it reads, and
    writes the rows in place: half a float32 cache's bytes per step, twice the tokens per
    byte of memory); float32 where the plain-jnp kernel does (XLA's CPU code would convert
    whole 16-bit pages to float32 as it gathers them). float16 models get bfloat16 too:
    float32's range (K/V rows computed in float32 never overflow it), one cache format
    for the kernel to read."""
    from xla_inference.kernels import backend, cpu_attention

    native = backend.attention_backend().name == backend.NATIVE and cpu_attention.available()
    return jnp.dtype(jnp.bfloat16 if native else jnp.float32)


# vLLM's fp8 names for --kv-cache-dtype, and the format each stores (fp8 is e4m3, as on CUDA).
FP8_KV_CACHE_DTYPES = {"fp8": jnp.float8_e4m3fn, "fp8_e4m3": jnp.float8_e4m3fn,
                       "fp8_e5m2": jnp.float8_e5m2}


@dataclasses.dataclass
class LoadedModel:
    """Phase one's result: a family, its config, and its weights on the host."""

    family: ModelFamily
    cfg: object
    params: object  # host arrays; None once an engine holds the placed copy
    precision: Precision
    # A pooling model's sequence-classification layer [labels, D] (float32), if it has one.
    score_weight: object = None

    def kv_layers(self) -> list[KvLayer]:
        return self.family.kv_layers(self.cfg)

    def kv_page_bytes(self, block_size: int) -> int:
        """Bytes of one KV page (block_size tokens) over every layer."""
        itemsize = self.precision.kv_cache.itemsize
        return sum(layer.num_arrays * block_size * layer.num_kv_heads * layer.head_size * itemsize
                   for layer in self.kv_layers())

    @property
    def weight_bytes(self) -> int:
        """Bytes of the host weights (quantized ones as packed), before placement."""
        return host_nbytes(self.params)

    @property
    def unread_bytes(self) -> int:
        """Bytes of the host weights still in the checkpoint files (load's reads_slices):
        placement will read them."""
        return sum(leaf.nbytes for leaf in jax.tree.leaves(self.params)
                   if getattr(leaf, "read_by_slice", False) is True)

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size


def load(model_path: str | Path, precision: Precision, *, gguf_file: str | None = None,
         random_seed: int | None = None, quantization: str | None = None,
         reads_slices: bool = False) -> LoadedModel:
    """Phase one: read (or, with random_seed, draw) the weights on the host in the policy's
    dtypes. The projections are narrowed, or quantized, here, before the KV cache is sized,
    so that the host holds one copy of each.

    `quantization`: vLLM's method name. A quantized checkpoint's (its quantization_config,
    or a GGUF file's blocks) projections stay quantized; on an unquantized checkpoint an
    online method ("int8", "fp8") quantizes every projection per output channel.

    `reads_slices` (a multi-host process): an unquantized safetensors checkpoint's tensors
    that reach the parameters as stored are not read here; build_engine's placement reads
    from the files only the slices this process's devices hold
    (loading/safetensors.CheckpointSlices). So are a quantized checkpoint's or a GGUF
    file's quantized projection weights: placement reads each device's rows and input
    columns of their packed values, scales and offsets (quantization/sliced.QuantSlices,
    quantization/packed.PackedSlices), and MoE experts stored one tensor per expert (only
    the experts or width slices its devices hold: loading/safetensors.ExpertStackSlices,
    quantization/experts.pack_experts_by_slice), and the views a loader takes of a stored
    tensor (a transpose, a split of axes, a part: experts stored fused, MLA's per-head
    matrices, from a quantized checkpoint too: loading/safetensors.CheckpointSlices). What
    a loader computes from the whole tensor (a GGUF embedding, GGUF float tensors) is read
    whole, as is what an online method quantizes."""
    family, cfg, params = load_model(model_path, precision.activations, gguf_file,
                                     random_seed=random_seed, quantization=quantization,
                                     reads_slices=reads_slices)
    params = pack_quantized(params, precision.weights, precision.activations)
    if precision.narrows_projections:
        params = narrow_projections(params, precision.weights)
    return LoadedModel(family, cfg, params, precision)


def load_pooling(model_path: str | Path, precision: Precision) -> LoadedModel:
    """Phase one for a pooling model (models/pooling_loader.py): the decoder's weights as
    load() gives them, and the classification layer when the checkpoint has one."""
    from xla_inference.models.pooling_loader import load_pooling_model

    family, cfg, params, score = load_pooling_model(model_path, precision.activations)
    params = pack_quantized(params, precision.weights, precision.activations)
    if precision.narrows_projections:
        params = narrow_projections(params, precision.weights)
    return LoadedModel(family, cfg, params, precision, score)


def build_engine(model: LoadedModel, engine_cfg: EngineConfig, *, tensor_parallel_size: int = 1,
                 data_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                 mesh: jax.sharding.Mesh | None = None,
                 keep_host_params: bool = False, lora: dict | None = None,
                 pooling: bool = False, expert_parallel: bool = False) -> ModelEngine:
    """Phase two: the mesh, the KV cache of engine_cfg.num_blocks pages and the weights
    placed shard by shard; the host copy of the weights is dropped (unless
    keep_host_params: a benchmark building several engines). Compile with
    `engine.warm_up()`. lora: LoraSlots' limits (max_loras, max_rank, max_cpu_loras) to
    serve LoRA adapters (lora/slots.py). pipeline_parallel_size: layers split into that
    many stages over a stage axis of the mesh (parallel/pipeline.py). expert_parallel
    (--enable-expert-parallel): an MoE model's experts split across data parallel replicas
    by expert rather than by width (runner/engine.ModelEngine)."""
    if mesh is None:
        mesh = build_mesh(tensor_parallel_size, data_parallel_size,
                          pipeline_parallel_size=pipeline_parallel_size)
    if lora is not None and model.family.name not in LORA_FAMILIES and model.family.lora is None:
        raise ValueError(f"xla-inference serves LoRA adapters on the {', '.join(LORA_FAMILIES)} "
                         f"native families, not on {model.family.name} (--model-impl vllm "
                         "serves them on vLLM's PyTorch model class: torch_models/lora.py)")
    if lora is not None and mesh.shape["data"] > 1:
        # Data parallel replicas share one set of slots; each replica's scheduler lets
        # max_loras adapters into its share of a step, so a step holds up to R times that.
        lora = dict(lora, max_loras=lora["max_loras"] * mesh.shape["data"])
    slots = None if lora is None else lora_slots(model, **lora)
    engine = ModelEngine(model.family, model.cfg, model.params, engine_cfg,
                         model.precision.kv_cache, mesh=mesh, lora=slots, pooling=pooling,
                         expert_parallel=expert_parallel)
    if not keep_host_params:
        model.params = None
    return engine


# The decoder families (models/decoder.py) whose projections LoRA adapters reach: every
# layer's attention and dense MLP (a MoE layer's experts are not targets: lora/peft.py).
LORA_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "qwen3_moe", "mixtral", "gemma3")


def lora_slots(model: LoadedModel, *, max_loras: int, max_rank: int, max_cpu_loras: int,
               target_modules: list[str] | None = None) -> LoraSlots:
    """Empty adapter slots for a decoder's q/k/v/o and gate/up/down projections and a MoE
    layer's experts (or the family's own targets: the torch path's), those of them that
    --lora-target-modules names where it is given, in the dtype of its projection weights."""
    if model.family.lora is not None:
        shapes, dtype = model.family.lora.targets(model.params, model.cfg)
    else:
        # A quantized base keeps its products; the stacks take the policy's projection dtype.
        shapes, dtype = decoder_targets(model.params), model.precision.weights
    if not shapes:
        raise ValueError("LoRA adapters are served only on the decoder families' q/k/v/o and "
                         "gate/up/down projections; this model has none")
    kept = restrict_targets(shapes, target_modules)
    if not kept:
        raise ValueError(f"--lora-target-modules {target_modules} names none of this model's "
                         f"LoRA targets ({sorted({m.rpartition('.')[2] for m in shapes})}, "
                         "experts)")
    return LoraSlots(kept, max_loras, max_rank, max_cpu_loras, dtype,
                     target_modules=target_modules)
