"""Loading the native CPU kernels leaves the process's floating point alone: a library
linked with -ffast-math would turn on flush-to-zero for everything in the process
(kernels/native.py compiles with it and links without); a kernel of the spare core's
library still loads where another of its sources does not build."""

import numpy as np

from xla_inference.kernels import cpu_attention, cpu_quantized


def test_loading_the_kernels_keeps_denormals():
    loaded = [cpu_attention.available(), cpu_quantized.available()]
    assert any(loaded), "no native kernel built here"
    tiny = np.float32(1e-40)  # a float32 denormal
    assert tiny * np.float32(1.0) == tiny != 0


def test_a_kernel_builds_alone_where_the_spare_core_library_does_not(tmp_path, monkeypatch,
                                                                      caplog):
    """The kernels sharing the spare core are one library; where one of its sources fails on
    this compiler, each other kernel still loads, from its own build (with the same bits),
    and the warning names the source that failed."""
    import jax
    import jax.numpy as jnp

    from xla_inference.kernels import cpu_dense, native

    broken = tmp_path / "broken_kernel.cc"
    broken.write_text("int broken( {\n")
    # (the library's other kernels left out: compiling them is not what is tested)
    monkeypatch.setattr(native, "SPARE_CORE_KERNELS", (native.SPARE_CORE, broken))
    target = "xla_inference_dense_matvec_built_alone"
    with caplog.at_level("WARNING", logger="xla_inference.kernels.native"):
        library = native.load_spare_core_kernel(cpu_dense._SOURCE, {target: cpu_dense._SYMBOL})
    assert "broken_kernel.cc" in caplog.text
    assert "quantized_matmul" not in library._name  # the dense kernel's own build
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 96)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((40, 96)), jnp.bfloat16)
    assert cpu_dense.available()
    np.testing.assert_array_equal(
        np.asarray(jax.jit(cpu_dense.ffi_dense_matvec, static_argnums=0)(target, x, w)),
        np.asarray(cpu_dense.dense_matvec(x, w)))
