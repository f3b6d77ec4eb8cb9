"""The house is layered: no package of xla_inference imports a package above it, and only
the vLLM adapter (plugin/), the torch path (torch_models/) and the launcher import vllm or
torch (docs/DESIGN.md)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "xla_inference"

# Bottom to top; a module may import its own package and any package listed before it.
LAYERS = ["torchvision_compat", "envs", "kernels", "parallel", "quantization", "loading", "lora",
          "layers", "multimodal", "models", "sampling", "runner", "spec_decode", "torch_models",
          "kv_transfer", "distributed", "plugin", "cli"]
# The only places vllm or torch may be imported: the adapter, the launcher, the torch path
# (vLLM's PyTorch models lowered through torchax), the KV connectors (vLLM's interface), the
# multi-host executors (vLLM's Executor) and the torchvision install shim.
ADAPTERS = {"torch_models", "kv_transfer", "distributed", "plugin", "cli", "torchvision_compat"}


def _package_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def test_every_package_has_a_layer():
    packages = {_package_of(p) for p in _modules()}
    assert packages <= set(LAYERS), f"packages without a layer: {packages - set(LAYERS)}"


def _violations(path: Path, own: str) -> list[str]:
    allowed = set(LAYERS[:LAYERS.index(own) + 1])
    found = []
    for name in _imports(path):
        parts = name.split(".")
        if parts[0] == "xla_inference" and len(parts) > 1 and parts[1] in LAYERS:
            if parts[1] not in allowed:
                found.append(f"{own} imports {name}, a layer above it")
        if own not in ADAPTERS and parts[0] in ("vllm", "torch"):
            found.append(f"core package {own} imports {name}")
    return found


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    assert _violations(path, _package_of(path)) == []


def test_the_checker_catches_upward_and_vllm_imports(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from xla_inference.runner.engine import ModelEngine\n"
                   "def f():\n    import torch\n")
    found = _violations(bad, "kernels")
    assert any("runner" in v for v in found) and any("torch" in v for v in found)
    assert _violations(bad, "plugin") == []
