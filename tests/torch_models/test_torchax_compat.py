"""The torchax shim (torch_models/torchax_compat.py): still needed on this torch, limited
to named-dimension overloads, gone after the import, and torchax computes right with it."""

import subprocess
import sys

import numpy as np
import torch


def test_torchax_still_fails_to_import_without_the_shim():
    """When this fails, torch or torchax agree again: drop the shim."""
    result = subprocess.run([sys.executable, "-c", "import torchax; torchax.default_env()"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "has no overload name" in result.stderr


def test_only_named_dimension_overloads_are_tolerated_and_the_lookup_is_restored():
    from xla_inference.torch_models.torchax_compat import (import_torchax,
                                                           is_named_dimension_overload,
                                                           tolerated_overloads)

    import_torchax()
    assert tolerated_overloads, "the shim tolerated nothing: it is no longer needed"
    for name in tolerated_overloads:
        packet, overload = name.split("::")[1].split(".")
        assert is_named_dimension_overload(overload)
        assert overload not in getattr(torch.ops.aten, packet).overloads()
    # After the import, a missing overload raises as torch's own lookup does.
    try:
        torch.ops.aten.prod.dim_Dimname
    except AttributeError:
        pass
    else:
        raise AssertionError("the shim's lookup outlived the import")


def test_torchax_lowers_a_small_network_after_the_shim():
    import jax
    import jax.numpy as jnp

    from xla_inference.torch_models.torchax_compat import import_torchax

    torchax = import_torchax()
    from torchax.interop import jax_view, torch_view

    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((3, 8)), rng.standard_normal((5, 8))

    @jax.jit
    def run(x, w):
        with torchax.default_env():
            return jax_view(torch.nn.functional.silu(torch_view(x) @ torch_view(w).T))

    got = np.asarray(run(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)))
    product = x @ w.T
    np.testing.assert_allclose(got, product / (1 + np.exp(-product)), rtol=1e-5, atol=1e-5)


_EMPTY_CACHE = """
import importlib, torch
from xla_inference.torch_models import torchax_compat
if {patched}:
    torchax_compat.import_torchax()
else:  # torchax as it imports (through the overload shim alone)
    with torchax_compat._tolerate_removed_named_dimension_overloads():
        importlib.import_module("torchax").default_env()
assert str(torch.accelerator.current_accelerator()) == "jax"
torch.accelerator.empty_cache()
"""


def test_emptying_torchs_cache_after_torchax_is_harmless():
    """torchax makes "jax" torch's current accelerator without a caching allocator, so
    torch.accelerator.empty_cache() (vLLM's engine shutdown calls it) fails; after
    import_torchax it does nothing. When the first half fails, torch or torchax fixed it:
    drop _no_torch_cache_to_empty_on_jax. A process each: the import changes torch's state."""
    def run(patched: bool):
        return subprocess.run([sys.executable, "-c", _EMPTY_CACHE.format(patched=patched)],
                              capture_output=True, text=True, timeout=300)

    raw = run(False)
    assert raw.returncode != 0 and "not a DeviceAllocator" in raw.stderr, raw.stderr[-2000:]
    patched = run(True)
    assert patched.returncode == 0, patched.stderr[-2000:]
