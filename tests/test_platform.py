"""The plugin as vLLM resolves it: dtype="auto" and the heads patch, in a fresh interpreter.

Fresh interpreters because the defect these guard against lived in import order: the
plugin's entry point imported vllm.config.model while vLLM was still choosing the platform,
so that module kept a CPU platform and "auto" resolved against the CPU's dtype list.

The rule checked: on the host CPU, "auto" means bfloat16 (bfloat16 projection matrices,
float32 elsewhere) where the CPU has avx512_bf16 and float32 where it has not, whatever the
checkpoint's dtype; an explicit dtype is kept. Both branches run on any machine: the probe
replaces the platform's CPU-flags reader.
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

    import xla_inference.plugin.platform as platform_module

    real_flags = platform_module._cpu_flags
    current_platform.pre_register_and_update()
    cpus = {"real": real_flags,
            "avx512_bf16": lambda: {"avx512f", "avx512_bf16"},
            "no_avx512_bf16": lambda: {"avx2", "avx512f"}}
    dtypes = {}
    for cpu, flags in cpus.items():
        platform_module._cpu_flags = flags
        for model in sys.argv[1:]:
            for dtype in ("auto", "float32"):
                args = EngineArgs(model=model, dtype=dtype, max_model_len=128)
                dtypes[f"{cpu} {model} {dtype}"] = str(args.create_model_config().dtype)
    print(json.dumps({
        "platform": type(current_platform).__name__,
        "model_module_platform": type(model_module.current_platform).__name__,
        "dtypes": dtypes,
    }))
""")


def _with_checkpoint_dtype(model_dir, dst, dtype: str):
    """`model_dir` with config.json saying its weights are `dtype` (vLLM reads only that)."""
    config = json.loads((model_dir / "config.json").read_text())
    config["torch_dtype"] = config["dtype"] = dtype
    dst.mkdir()
    for f in model_dir.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny Llama checkpoints declaring each dtype, by that dtype."""
    root = tmp_path_factory.mktemp("platform")
    f32 = save_tiny_llama(root / "float32")
    return {"float32": f32,
            "bfloat16": _with_checkpoint_dtype(f32, root / "bfloat16", "bfloat16"),
            "float16": _with_checkpoint_dtype(f32, root / "float16", "float16")}


@pytest.fixture(scope="module")
def probed(checkpoints) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, *map(str, checkpoints.values())],
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _resolved(probed, checkpoints, cpu: str, checkpoint: str, dtype: str) -> str:
    return probed["dtypes"][f"{cpu} {checkpoints[checkpoint]} {dtype}"]


def test_dtype_auto_resolves_against_our_platform(probed):
    assert probed["platform"] == "XlaPlatform"
    assert probed["model_module_platform"] == "XlaPlatform"


@pytest.mark.parametrize("checkpoint", ["float32", "bfloat16", "float16"])
def test_dtype_auto_is_bfloat16_where_the_cpu_has_avx512_bf16(probed, checkpoints, checkpoint):
    assert _resolved(probed, checkpoints, "avx512_bf16", checkpoint, "auto") == "torch.bfloat16"


@pytest.mark.parametrize("checkpoint", ["float32", "bfloat16", "float16"])
def test_dtype_auto_is_float32_without_avx512_bf16(probed, checkpoints, checkpoint):
    assert _resolved(probed, checkpoints, "no_avx512_bf16", checkpoint, "auto") == "torch.float32"


@pytest.mark.parametrize("cpu", ["avx512_bf16", "no_avx512_bf16"])
def test_an_explicit_float32_is_kept(probed, checkpoints, cpu):
    for checkpoint in checkpoints:
        assert _resolved(probed, checkpoints, cpu, checkpoint, "float32") == "torch.float32"


def test_dtype_auto_on_this_machine_follows_its_cpu_flags(probed, checkpoints):
    # The unpatched reader: this machine's /proc/cpuinfo, read here independently.
    with open("/proc/cpuinfo") as f:
        has_bf16 = any("avx512_bf16" in line.split() for line in f if line.startswith("flags"))
    expected = "torch.bfloat16" if has_bf16 else "torch.float32"
    assert _resolved(probed, checkpoints, "real", "float32", "auto") == expected


@pytest.mark.parametrize("transfer,role,message", [
    ({"do_remote_decode": True}, None, "--kv-transfer-config"),
    ({"do_remote_decode": True}, "kv_consumer", "but it is a kv_consumer"),
    ({"do_remote_prefill": True, "remote_host": "h"}, "kv_producer", "but it is a kv_producer"),
])
def test_kv_transfer_params_a_server_cannot_act_on_are_refused(transfer, role, message):
    from vllm.exceptions import VLLMValidationError

    from xla_inference.plugin.platform import _refuse_kv_transfer_params_unserved

    with pytest.raises(VLLMValidationError, match=message):
        _refuse_kv_transfer_params_unserved(transfer, role)


@pytest.mark.parametrize("transfer,role", [
    (None, None), ({"do_remote_decode": True}, "kv_producer"),
    ({"do_remote_prefill": True, "do_remote_decode": False}, "kv_consumer"),
    ({"do_remote_decode": True}, "kv_both"),
])
def test_kv_transfer_params_for_this_side_pass(transfer, role):
    from xla_inference.plugin.platform import _refuse_kv_transfer_params_unserved

    _refuse_kv_transfer_params_unserved(transfer, role)
