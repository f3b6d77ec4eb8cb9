"""The plugin as vLLM resolves it: dtype="auto" and the heads patch, in a fresh interpreter.

Fresh interpreters because the defect these guard against lived in import order: the
plugin's entry point imported vllm.config.model while vLLM was still choosing the platform,
so that module kept a CPU platform and "auto" resolved against the CPU's dtype list.
"""

import json
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import save_tiny_llama

pytestmark = [pytest.mark.slow, pytest.mark.vllm]  # starts fresh interpreters that import vLLM

PROBE = textwrap.dedent("""
    import json, sys
    import vllm.config.model as model_module
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform

    args = EngineArgs(model=sys.argv[1], dtype="auto", max_model_len=128)
    current_platform.pre_register_and_update()
    config = args.create_model_config()
    print(json.dumps({
        "platform": type(current_platform).__name__,
        "model_module_platform": type(model_module.current_platform).__name__,
        "dtype": str(config.dtype),
    }))
""")


def _probe(model_dir) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(model_dir)], capture_output=True,
                         text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("platform") / "llama")


def test_dtype_auto_resolves_against_our_platform(model_dir):
    got = _probe(model_dir)
    assert got["platform"] == "XlaPlatform"
    assert got["model_module_platform"] == "XlaPlatform"
    # The host CPU lists only float32 (bfloat16 is several times slower in XLA's CPU backend).
    assert got["dtype"] == "torch.float32"


def test_dtype_auto_serves_a_bfloat16_checkpoint_in_float32(model_dir, tmp_path):
    config = json.loads((model_dir / "config.json").read_text())
    config["torch_dtype"] = config["dtype"] = "bfloat16"
    bf16_dir = tmp_path / "bf16"
    bf16_dir.mkdir()
    for f in model_dir.iterdir():
        (bf16_dir / f.name).symlink_to(f)
    (bf16_dir / "config.json").unlink()
    (bf16_dir / "config.json").write_text(json.dumps(config))
    assert _probe(bf16_dir)["dtype"] == "torch.float32"
