"""A tiny random Gemma3ForConditionalGeneration saved by transformers (SigLIP tower on 64x64
images in 8x8 patches, 16 image tokens per image), with a word-level tokenizer ("t3 t4 ...")
that knows Gemma 3's image tokens and a processor config: enough for transformers' Gemma 3
processor and for vLLM's gemma3_mm front end."""

from pathlib import Path

import numpy as np

VOCAB = 320
BOI, EOI, IMAGE_TOKEN = 300, 301, 302  # <start_of_image>, <end_of_image>, <image_soft_token>
# vLLM's gemma3_mm processor looks these up; the word-level tokenizer never produces them
# (whitespace splits words), so an image's placeholder is <boi> 16 x <image_soft_token> <eoi>.
NEWLINES = {"\n": 303, "\n\n": 304, "\n\n\n": 305, "\n\n\n\n": 306}
SPECIALS = {"<start_of_image>": BOI, "<end_of_image>": EOI, "<image_soft_token>": IMAGE_TOKEN}
IMAGE = "<start_of_image>"  # what a prompt writes for an image (the processor expands it)
IMAGE_SIZE, PATCH, MM_TOKENS = 64, 8, 16
SLIDING_WINDOW = 48


def save_tiny_gemma3_vision(path: Path, seed: int = 0, hidden_size: int = 64, num_heads: int = 4,
                            image_size: int = IMAGE_SIZE, patch_size: int = PATCH,
                            mm_tokens: int = MM_TOKENS, sliding_window: int = SLIDING_WINDOW,
                            max_position_embeddings: int = 512) -> Path:
    """hidden_size / num_heads: the language model's (head dim 16 by default; vLLM's CPU
    attention, for benchmarks, needs 32 or more)."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    config = Gemma3Config(
        text_config={"hidden_size": hidden_size, "intermediate_size": 96, "num_hidden_layers": 2,
                     "num_attention_heads": num_heads, "num_key_value_heads": num_heads // 2,
                     "head_dim": hidden_size // num_heads, "vocab_size": VOCAB,
                     "query_pre_attn_scalar": hidden_size // num_heads,
                     "sliding_window": sliding_window,
                     "layer_types": ["sliding_attention", "full_attention"],
                     "max_position_embeddings": max_position_embeddings, "bos_token_id": 1, "eos_token_id": 2,
                     "pad_token_id": 0},
        vision_config={"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": image_size, "patch_size": patch_size,
                       "vision_use_head": False},
        mm_tokens_per_image=mm_tokens, boi_token_index=BOI, eoi_token_index=EOI,
        image_token_index=IMAGE_TOKEN)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # unit-scale weights: every error in the layout shows
        for name, tensor in model.named_parameters():
            if "norm" in name and "layer_norm" not in name and "layernorm" not in name:
                tensor.uniform_(-0.5, 0.5)  # Gemma's (1 + w) norms
            elif "layer_norm" in name or "layernorm" in name:
                tensor.uniform_(0.5, 1.5) if name.endswith("weight") else tensor.normal_(0.0, 0.1)
            elif tensor.dim() > 1:
                tensor.normal_(0.0, tensor[0].numel() ** -0.5)
            else:
                tensor.normal_(0.0, 0.1)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    _hub_tower_names(Path(path) / "model.safetensors")
    _save_processor(path, image_size, mm_tokens)
    return Path(path)


def _hub_tower_names(file: Path) -> None:
    """The tower's tensors renamed as the Hub's Gemma 3 checkpoints (and vLLM's loader)
    name them, `vision_tower.vision_model.*`; transformers 5 saves `vision_tower.*` and
    reads either."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(file)
    renamed = {("vision_tower.vision_model." + k[len("vision_tower."):]
                if k.startswith("vision_tower.") else k): v for k, v in tensors.items()}
    save_file(renamed, file, metadata={"format": "pt"})


def _save_processor(path: Path, image_size: int, mm_tokens: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Gemma3Processor, PreTrainedTokenizerFast
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"t{i}": i for i in range(3, BOI)}
    vocab |= SPECIALS | NEWLINES | {f"t{i}": i for i in range(max(NEWLINES.values()) + 1, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<pad>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>", additional_special_tokens=list(SPECIALS),
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"})
    image_processor = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size},
                                              image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                image_seq_length=mm_tokens)
    processor.save_pretrained(path)


def image(height: int, width: int, seed: int):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def hf_greedy(model_dir: Path, text: str, images: list, num_new: int) -> list[int]:
    """transformers' greedy continuation (float32; Gemma 3's image masks from token_type_ids
    each token), as tests/helpers.hf_image_greedy says."""
    from tests.helpers import hf_image_greedy

    return hf_image_greedy("Gemma3ForConditionalGeneration", "token_type_ids", model_dir, text,
                           images, num_new)
