"""Multimodal inputs on the runner's side: the encoder outputs kept between steps, and the
parts of a step a multimodal family needs beyond the tokens (models/interface.py's
MultimodalStepBatch): each token's rope positions, and the encoder's rows that replace
the placeholder tokens of the scheduled range (an image's placeholders may be cut across
chunked-prefill steps: each step takes the rows of its slice)."""

import numpy as np

from xla_inference.models.interface import MultimodalStepBatch, StepBatch
from xla_inference.runner.requests import RequestState


class EncoderCache:
    """Encoder outputs (host arrays [n, D]) by item identifier, from the step that encodes
    an item until vLLM frees it (its free_encoder_mm_hashes); requests with the same
    identifier (the same image) share one."""

    def __init__(self):
        self.outputs: dict[str, np.ndarray] = {}

    def __contains__(self, identifier: str) -> bool:
        return identifier in self.outputs

    def put(self, identifier: str, embeds) -> None:
        self.outputs[identifier] = np.asarray(embeds)

    def free(self, identifiers) -> None:
        for identifier in identifiers:
            self.outputs.pop(identifier, None)

    def clear(self) -> None:
        self.outputs.clear()

    def rows(self, identifier: str, start: int, stop: int) -> np.ndarray:
        if identifier not in self.outputs:
            raise RuntimeError(f"multimodal item {identifier} is scheduled but was never "
                               "encoded (or was freed before its placeholders were computed)")
        return self.outputs[identifier][start:stop]


def token_rope_positions(req: RequestState, first: int, count: int) -> np.ndarray:
    """[3, count] rope positions of the request's tokens first..first+count: the prompt's
    from its table, later ones their place plus the request's delta on every row."""
    prompt = req.mrope_positions
    cut = min(max(first, 0), prompt.shape[1])
    end = min(first + count, prompt.shape[1])
    later = np.arange(max(first, prompt.shape[1]), first + count) + req.mrope_delta
    return np.concatenate([prompt[:, cut:end], np.broadcast_to(later, (3, later.size))], axis=1)


def _embedded_tokens(item, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Of the item's placeholder tokens lo..hi (prompt places), those that take an encoder
    row (counted from lo), and which row each takes."""
    place = np.arange(lo - item.offset, hi - item.offset)
    if item.is_embed is None:
        return place - place[0], place
    taken = np.asarray(item.is_embed, bool)
    row_of_place = np.cumsum(taken) - 1
    chosen = place[taken[place]]
    return chosen - place[0], row_of_place[chosen]


def multimodal_batch(batch: StepBatch, scheduled: list[tuple[RequestState, int]],
                     cache: EncoderCache, width: int, dtype, rope_positions,
                     blank=None) -> MultimodalStepBatch:
    """`batch` (build_step_batch's, for `scheduled`) with each token's rope positions and the
    encoder rows of the placeholders in it. rope_positions(num_prompt_tokens, items) ->
    ([3, P], delta) fills a request's table the first time it runs.

    blank(T) -> (embeds [T, width], mask [T]): what a step in which no token takes an
    encoder row (every decode step, text-only prefills) passes instead of a zeroed [T, width]
    array built on the host and copied to the device each time: the engine's placeholders,
    already on the device in the program's shapes (so the same program runs). None: zeros
    built here."""
    T = batch.num_tokens
    positions = np.broadcast_to(np.asarray(batch.attention.positions), (3, T)).copy()
    pieces = []  # (step tokens, item identifier, encoder rows)
    start = 0
    for req, num_new in scheduled:
        if req.mrope_positions is None:
            req.mrope_positions, req.mrope_delta = rope_positions(req.num_prompt_tokens,
                                                                  req.mm_items)
        first = req.num_computed_tokens
        positions[:, start:start + num_new] = token_rope_positions(req, first, num_new)
        pieces += _step_embeds(req, first, num_new, start)
        start += num_new
    if pieces or blank is None:
        embeds, mask = np.zeros((T, width), dtype), np.zeros(T, bool)
        for tokens, identifier, rows in pieces:
            embeds[tokens] = cache.rows(identifier, 0, None)[rows]
            mask[tokens] = True
    else:
        embeds, mask = blank(T)
    return MultimodalStepBatch(batch.input_ids, batch.attention, batch.logits_indices,
                               mrope_positions=positions, embeds=embeds, embeds_mask=mask)


def _step_embeds(req: RequestState, first: int, num_new: int, start: int) -> list:
    """The encoder rows the request's tokens first..first+num_new take (placed from step
    token `start`): (step tokens, item identifier, rows of its encoder output) per item."""
    pieces = []
    for item in req.mm_items:
        lo, hi = max(first, item.offset), min(first + num_new, item.offset + item.length)
        if lo < hi:
            tokens, rows = _embedded_tokens(item, lo, hi)
            pieces.append((start + lo - first + tokens, item.identifier, rows))
    return pieces
