"""The Pallas GPU attention kernels compile to Hopper machine code on this CPU.

test_pallas_gpu_attention.py proves the kernels' results (interpret mode) and that Pallas
lowers them to Triton IR. This goes one step further without a GPU: the Triton IR that
Pallas emits for CUDA (captured from the lowering while jax.export lowers the call) is
compiled by the Triton compiler installed here (torch's dependency) for sm_90 (H100/H200),
through its layout, pipelining and PTX passes, to a cubin (ptxas). A kernel whose tiles,
gathers, dots or fp8 casts Triton cannot lay out on Hopper fails here rather than on the
first GPU machine. (The GPU build of jaxlib carries its own Triton; the IR is the same.)
"""

import functools

import jax
import jax.numpy as jnp
import pytest
import triton
from jax._src.pallas.triton import pallas_call_registration
from triton.backends.compiler import GPUTarget

from xla_inference.kernels import pallas_gpu_attention

pytestmark = pytest.mark.slow

HOPPER = GPUTarget("cuda", 90, 32)


def _triton_modules(monkeypatch, *, num_tokens, num_heads, num_kv_heads, head_dim, dtype,
                    cache_dtype, **kw):
    """The Triton IR (text) of each kernel of one call, lowered for CUDA."""
    modules = []
    lower = pallas_call_registration.lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = lower(*args, **kwargs)
        modules.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    monkeypatch.setattr(pallas_call_registration.lowering, "lower_jaxpr_to_triton_module",
                        capture)
    cache = jax.ShapeDtypeStruct((4096 * 16, num_kv_heads, head_dim), cache_dtype)
    ids = jax.ShapeDtypeStruct((num_tokens,), jnp.int32)
    fn = jax.jit(functools.partial(pallas_gpu_attention.paged_attention, block_size=16,
                                   scale=0.1, **kw))
    jax.export.export(fn, platforms=["cuda"], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
        jax.ShapeDtypeStruct((num_tokens, num_heads, head_dim), dtype), cache, cache, ids, ids,
        jax.ShapeDtypeStruct((256, 512), jnp.int32))
    return modules


@pytest.mark.parametrize("case", [
    dict(num_heads=32, num_kv_heads=8, head_dim=128, dtype=jnp.bfloat16,
         cache_dtype=jnp.bfloat16),
    dict(num_heads=12, num_kv_heads=4, head_dim=96, dtype=jnp.float32,
         cache_dtype=jnp.float8_e5m2, sliding_window=100, soft_cap=30.0, attention_chunk=64,
         k_scale=0.5, v_scale=2.0),
], ids=["llama8b-bf16", "h96-f32-fp8-masks"])
def test_kernels_compile_for_hopper(monkeypatch, tmp_path, case):
    modules = _triton_modules(monkeypatch, num_tokens=64, **case)
    assert len(modules) == 2  # the tile kernel and the split-K decode kernel
    for i, module in enumerate(modules):
        path = tmp_path / f"kernel{i}.ttir"
        path.write_text(module)
        warps = 4  # the kernel's choice for head dims <= 128
        kernel = triton.compile(str(path), target=HOPPER,
                                options=dict(num_warps=warps, num_stages=2))
        assert ".target sm_90" in kernel.asm["ptx"]
        assert len(kernel.asm["cubin"]) > 0
        assert kernel.metadata.shared <= 227 * 1024  # fits an H100's shared memory
