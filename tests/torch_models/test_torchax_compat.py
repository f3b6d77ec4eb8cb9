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
