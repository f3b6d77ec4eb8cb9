"""Lets torchvision import next to vLLM's CPU torch, for the image processors.

vLLM's multimodal models (qwen2_vl, gemma3_mm, ...) import transformers' image processors,
which are built on torchvision's tensor transforms (resize, normalize: plain torch code).
The only torchvision build for vLLM's torch 2.13 (0.28.0, pinned to torch==2.13.0) is the
CUDA one: its C++ extension (detection ops such as nms) needs libtorch_cuda and does not
load against torch 2.13.0+cpu. torchvision tolerates that, except for two fake-tensor
registrations (`torchvision::nms`, `torchvision::qnms`) that it makes unconditionally and
that fail when the operator was never defined, so `import torchvision` (and with it
`import transformers`) raises.

`install()` puts a finder on `sys.meta_path` that, the first time torchvision is imported,
defines those two operator schemas when torchvision's extension cannot load; their
implementations stay absent, so calling them fails, as any extension op does when the
extension is missing. The `.pth` file that ./dev writes calls `install()` at interpreter
start-up (every process: server, engine core, tests); it imports nothing heavy until
torchvision itself is imported.
"""

import importlib.abc
import importlib.util
import os
import sys

_UNCONDITIONAL_FAKE_OPS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBRARIES = []  # keeps the torch.library fragment (and so its definitions) alive


def _extension_loads(package_dir: str) -> bool:
    """Loads torchvision's C++ extension as torchvision itself would; False if it cannot."""
    import torch

    candidates = [name for name in os.listdir(package_dir) if name.startswith("_C.") and name.endswith(".so")]
    if not candidates:
        return False
    try:
        torch.ops.load_library(os.path.join(package_dir, candidates[0]))
        return True
    except (ImportError, OSError):
        return False


def define_missing_ops(package_dir: str) -> bool:
    """Defines the schemas torchvision registers fakes for; True if it had to."""
    if _extension_loads(package_dir):
        return False
    import torch

    library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _UNCONDITIONAL_FAKE_OPS:
        name = schema.split("(", 1)[0]
        if not hasattr(torch.ops.torchvision, name):
            library.define(schema)
    _LIBRARIES.append(library)
    return True


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    """Runs `define_missing_ops` once, just before torchvision's own import."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torchvision")
        if spec is not None and spec.submodule_search_locations:
            define_missing_ops(list(spec.submodule_search_locations)[0])
        return spec


def install() -> None:
    if "torchvision" in sys.modules or any(isinstance(f, _TorchvisionFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _TorchvisionFinder())
