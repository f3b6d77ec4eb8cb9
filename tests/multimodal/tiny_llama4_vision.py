"""A tiny random Llama4ForConditionalGeneration saved by transformers (a vision tower on 32x32
tiles in 8x8 patches, pixel-shuffled to 4 image tokens a tile; up to 4 tiles an image plus
its global tile), with a word-level tokenizer ("t3 t4 ...") that knows Llama 4's image
tokens and a processor config: enough for transformers' Llama 4 processor and for vLLM's
mllama4 front end."""

from pathlib import Path

import numpy as np

VOCAB = 320
# <|image_start|>, <|image_end|>, <|image|>, <|patch|>, <|tile_x_separator|>, <|tile_y_separator|>
IMAGE_START, IMAGE_END, IMAGE_TOKEN, PATCH_TOKEN, TILE_X, TILE_Y = range(300, 306)
SPECIALS = {"<|image_start|>": IMAGE_START, "<|image_end|>": IMAGE_END, "<|image|>": IMAGE_TOKEN,
            "<|patch|>": PATCH_TOKEN, "<|tile_x_separator|>": TILE_X,
            "<|tile_y_separator|>": TILE_Y}
IMAGE = "<|image|>"  # what a prompt writes for an image (the processor expands it)
TILE, PATCH, MAX_TILES = 32, 8, 4
TOKENS_PER_TILE = (TILE // PATCH) ** 2 // 4  # pixel shuffle 0.5: a quarter of the patches
VISION_OUTPUT = 48  # the adapter's width, the projector's input


def save_tiny_llama4_vision(path: Path, seed: int = 0) -> Path:
    import torch
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    torch.manual_seed(seed)
    config = Llama4Config(
        # The text model of tests/helpers.save_tiny_family's "llama4": rope, rope+MoE, rope,
        # NoPE+MoE layers, chunks of 8 (an image's tokens cross chunks), temperature tuning.
        text_config={"vocab_size": VOCAB, "hidden_size": 64, "head_dim": 32,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 4,
                     "intermediate_size": 48, "intermediate_size_mlp": 96,
                     "num_local_experts": 4, "num_experts_per_tok": 1,
                     "interleave_moe_layer_step": 2, "attention_chunk_size": 8,
                     "use_qk_norm": True, "floor_scale": 4, "attn_scale": 0.5,
                     "max_position_embeddings": 512, "bos_token_id": 1, "eos_token_id": 2,
                     "pad_token_id": 0},
        # intermediate_size is both the encoder MLP's width and the pixel-shuffled width
        # (hidden / 0.5**2) the adapter takes, as in the released models.
        vision_config={"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": TILE, "patch_size": PATCH,
                       "pixel_shuffle_ratio": 0.5, "projector_input_dim": VISION_OUTPUT,
                       "projector_output_dim": VISION_OUTPUT, "vision_output_dim": VISION_OUTPUT,
                       "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
        boi_token_index=IMAGE_START, eoi_token_index=IMAGE_END, image_token_index=PATCH_TOKEN)
    model = Llama4ForConditionalGeneration(config).eval()  # float32 (its rotary table complex)
    with torch.no_grad():  # unit-scale weights: every error in the layout shows
        for name, tensor in model.named_parameters():
            if "norm" in name:
                tensor.uniform_(0.5, 1.5) if name.endswith("weight") else tensor.normal_(0.0, 0.1)
            elif tensor.dim() > 1 and "experts" in name:
                tensor.normal_(0.0, tensor.shape[-2] ** -0.5)  # [E, in, out]
            elif tensor.dim() > 1:
                tensor.normal_(0.0, tensor[0].numel() ** -0.5)
            else:
                tensor.normal_(0.0, 0.3)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    _save_processor(path)
    return Path(path)


def _save_processor(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Llama4ImageProcessor, Llama4Processor, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"t{i}": i for i in range(3, IMAGE_START)}
    vocab |= SPECIALS | {f"t{i}": i for i in range(TILE_Y + 1, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<pad>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>", additional_special_tokens=list(SPECIALS))
    image_processor = Llama4ImageProcessor(size={"height": TILE, "width": TILE},
                                           max_patches=MAX_TILES)
    processor = Llama4Processor(image_processor=image_processor, tokenizer=tokenizer,
                                patch_size=PATCH, pixel_shuffle_ratio=0.5)
    processor.save_pretrained(path)


def image(height: int, width: int, seed: int):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def hf_greedy(model_dir: Path, text: str, images: list, num_new: int) -> list[int]:
    """transformers' greedy continuation (float32), the whole sequence run again for each
    token; EOS neither stopping nor banned (vLLM's ignore_eos). The processor's bfloat16
    pixels are widened to float32 (exact) for the float32 model."""
    import torch
    from transformers import AutoProcessor, Llama4ForConditionalGeneration

    inputs = AutoProcessor.from_pretrained(model_dir)(text=[text], images=images or None,
                                                      return_tensors="pt")
    model = Llama4ForConditionalGeneration.from_pretrained(model_dir).eval()
    ids = inputs["input_ids"]
    pixels = inputs["pixel_values"].float() if images else None
    new = []
    with torch.no_grad():
        for _ in range(num_new):
            token = int(model(input_ids=ids, pixel_values=pixels).logits[0, -1].argmax())
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return new
