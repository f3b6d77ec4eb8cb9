"""runner/huge_pages.py: the weights' host buffers collapsed onto 2 MiB pages keep their
values and addresses, the regions asked for cover each buffer, and the switch turns it off.
Where this Linux grants huge pages on request (THP not "never", MADV_COLLAPSE known), the
process's AnonHugePages grows by what was collapsed."""

import platform
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from xla_inference.runner import huge_pages


def _anon_huge_kib() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def _thp_on_request() -> bool:
    """Linux 6.1+ (MADV_COLLAPSE) with transparent huge pages not turned off."""
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    version = re.match(r"(\d+)\.(\d+)", platform.release())
    return (sys.platform.startswith("linux") and path.exists() and version is not None
            and tuple(map(int, version.groups())) >= (6, 1)
            and "[never]" not in path.read_text())


def _weights():
    rng = np.random.default_rng(0)
    host = {"big": rng.standard_normal((2048, 1536)).astype(np.float32),  # 12 MiB
            "small": rng.integers(-127, 128, (192, 576)).astype(np.int8)}
    return host, jax.tree.map(jnp.asarray, host)


def test_regions_cover_each_buffer():
    _, weights = _weights()
    regions = huge_pages.host_regions(jax.tree.leaves(weights))
    assert regions == sorted(set(regions))
    for a in jax.tree.leaves(weights):
        start = a.unsafe_buffer_pointer()
        end = start + a.nbytes
        mine = [r for r in regions if r < end and r + huge_pages.HUGE_PAGE > start]
        assert mine[0] <= start and mine[-1] + huge_pages.HUGE_PAGE >= end
        assert len(mine) == (end - 1) // huge_pages.HUGE_PAGE - start // huge_pages.HUGE_PAGE + 1


def test_collapse_keeps_values_and_addresses(monkeypatch):
    monkeypatch.setenv("XLA_INFERENCE_HUGE_PAGES", "1")
    # Asked for as on a THP `madvise` machine, whatever this machine's setting is.
    monkeypatch.setattr(huge_pages, "_thp_enabled_text", lambda: "always [madvise] never\n")
    host, weights = _weights()
    addresses = [a.unsafe_buffer_pointer() for a in jax.tree.leaves(weights)]
    before = _anon_huge_kib() if sys.platform.startswith("linux") else 0
    done, asked = huge_pages.collapse(weights)
    assert asked >= 6  # 12 MiB spans at least 6 regions
    assert [a.unsafe_buffer_pointer() for a in jax.tree.leaves(weights)] == addresses
    for name, a in weights.items():
        np.testing.assert_array_equal(np.asarray(a), host[name])
    # A product on the collapsed buffers against float64 numpy.
    x = np.random.default_rng(1).standard_normal(1536)
    y = jax.jit(lambda w, v: w @ v)(weights["big"], jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(y), host["big"].astype(np.float64) @ x,
                               rtol=1e-4, atol=1e-3)
    if _thp_on_request():
        assert done >= 1
        assert _anon_huge_kib() - before >= 2048  # at least one 2 MiB page more


def test_switch_off(monkeypatch):
    monkeypatch.setenv("XLA_INFERENCE_HUGE_PAGES", "0")
    _, weights = _weights()
    assert huge_pages.collapse(weights) == (0, 0)


class _CountingMadvise:
    def __init__(self):
        self.calls = 0

    def __call__(self, start, length, advice):
        self.calls += 1
        return 0


def test_thp_never_skips_the_collapse(monkeypatch):
    """MADV_COLLAPSE would collapse even under `never` (it ignores the sysfs settings): an
    admin's `never` asks for nothing; `madvise` asks for every region."""
    monkeypatch.setenv("XLA_INFERENCE_HUGE_PAGES", "1")
    monkeypatch.setattr(sys, "platform", "linux")
    counting = _CountingMadvise()
    monkeypatch.setattr(huge_pages, "_madvise", lambda: counting)
    _, weights = _weights()
    monkeypatch.setattr(huge_pages, "_thp_enabled_text", lambda: "always madvise [never]\n")
    assert huge_pages.collapse(weights) == (0, 0)
    assert counting.calls == 0
    monkeypatch.setattr(huge_pages, "_thp_enabled_text", lambda: "always [madvise] never\n")
    done, asked = huge_pages.collapse(weights)
    assert asked >= 6 and done == asked == counting.calls
