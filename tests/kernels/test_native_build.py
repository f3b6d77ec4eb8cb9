"""Loading the native CPU kernels leaves the process's floating point alone: a library
linked with -ffast-math would turn on flush-to-zero for everything in the process
(kernels/native.py compiles with it and links without)."""

import numpy as np

from xla_inference.kernels import cpu_attention, cpu_quantized


def test_loading_the_kernels_keeps_denormals():
    loaded = [cpu_attention.available(), cpu_quantized.available()]
    assert any(loaded), "no native kernel built here"
    tiny = np.float32(1e-40)  # a float32 denormal
    assert tiny * np.float32(1.0) == tiny != 0
