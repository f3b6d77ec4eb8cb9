"""A tiny random Qwen2.5-VL checkpoint saved by transformers, with a word-level tokenizer
("t3 t4 ...") that knows the vision special tokens and a processor config: enough for
transformers' Qwen2.5-VL processor and for vLLM's multimodal front end."""

from pathlib import Path

import numpy as np

VOCAB = 320
IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END = 300, 301, 302, 303
SPECIALS = {"<|image_pad|>": IMAGE_PAD, "<|video_pad|>": VIDEO_PAD,
            "<|vision_start|>": VISION_START, "<|vision_end|>": VISION_END}
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
MIN_PIXELS, MAX_PIXELS = 28 * 28 * 4, 28 * 28 * 64  # 2x2 .. 8x8 merged patches


def save_tiny_qwen2_5_vl(path: Path, seed: int = 0, max_pixels: int = MAX_PIXELS,
                         hidden_size: int = 64, num_heads: int = 4,
                         mrope_section: tuple = (2, 3, 3), vision_depth: int = 2) -> Path:
    """hidden_size / num_heads: the language model's (head dim 16 by default; vLLM's CPU
    attention, for benchmarks, needs 32 or more); mrope_section sums to half the head dim.
    vision_depth: the vision tower's blocks (block 1 has full attention, the others windows)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": hidden_size, "intermediate_size": 96, "num_hidden_layers": 2,
                     "num_attention_heads": num_heads, "num_key_value_heads": num_heads // 2,
                     "vocab_size": VOCAB,
                     "max_position_embeddings": 512, "bos_token_id": 1, "eos_token_id": 2,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                         "mrope_section": list(mrope_section)}},
        vision_config={"depth": vision_depth, "hidden_size": 32, "intermediate_size": 48,
                       "num_heads": 2, "out_hidden_size": hidden_size,
                       "fullatt_block_indexes": [1], "window_size": 112},
        image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():  # unit-scale weights: every error in the positions shows
        for name, tensor in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                tensor.uniform_(0.5, 1.5)
            elif tensor.dim() > 1:
                tensor.normal_(0.0, tensor[0].numel() ** -0.5)
            else:
                tensor.normal_(0.0, 0.1)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    _save_processor(path, max_pixels)
    return Path(path)


def _save_processor(path: Path, max_pixels: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    # Special tokens are split out of words first: none may be a prefix of a "t<i>" word.
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"t{i}": i for i in range(3, IMAGE_PAD)}
    vocab |= SPECIALS | {f"t{i}": i for i in range(VISION_END + 1, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<unk>",
                                        additional_special_tokens=list(SPECIALS))
    size = {"shortest_edge": MIN_PIXELS, "longest_edge": max_pixels}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size),
        tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(size=size))
    processor.save_pretrained(path)


def video_frames(num_frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """Random uint8 frames [num_frames, height, width, 3] (two frames per temporal patch)."""
    return np.random.default_rng(seed).integers(0, 256, (num_frames, height, width, 3), np.uint8)


def image(height: int, width: int, seed: int):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def hf_greedy(model_dir: Path, text: str, images: list, num_new: int) -> list[int]:
    """transformers' greedy continuation (float32; its own M-RoPE positions each token), as
    tests/helpers.hf_image_greedy says."""
    from tests.helpers import hf_image_greedy

    return hf_image_greedy("Qwen2_5_VLForConditionalGeneration", "mm_token_type_ids", model_dir,
                           text, images, num_new)


def video_metadata(num_frames: int, fps: float) -> dict:
    """What vLLM's Qwen2.5-VL processor needs next to frames given as an array (no decoding):
    frame pairs are temporal_patch_size / fps seconds apart (second_per_grid_ts)."""
    return {"fps": fps, "duration": num_frames / fps, "total_num_frames": num_frames,
            "frames_indices": list(range(num_frames)), "video_backend": "opencv"}


def hf_video_greedy(model_dir: Path, text: str, frames: np.ndarray, fps: float,
                    num_new: int) -> list[int]:
    """transformers' greedy continuation of a prompt with one video, as hf_greedy's (the
    whole sequence run again for each token; EOS neither stopping nor banned)."""
    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    inputs = AutoProcessor.from_pretrained(model_dir)(
        text=[text], videos=[frames], return_tensors="pt", do_sample_frames=False,
        video_metadata=[{"fps": fps, "total_num_frames": len(frames)}])
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir).eval()
    ids = inputs.pop("input_ids")
    inputs.pop("attention_mask")
    new = []
    with torch.no_grad():
        for _ in range(num_new):
            new.append(int(model(input_ids=ids, **inputs).logits[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[new[-1]]])], dim=1)
            inputs["mm_token_type_ids"] = torch.cat(
                [inputs["mm_token_type_ids"], torch.zeros((1, 1), dtype=torch.long)], dim=1)
    return new
