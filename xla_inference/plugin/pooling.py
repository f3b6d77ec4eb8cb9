"""vLLM's pooling runner on our engine: the tasks a pooling model serves, the checks at
start-up, and each step's pooler_output from the rows the engine gathered
(runner/pooling.py)."""

import dataclasses
import logging

import numpy as np
import torch

from xla_inference.runner.pooling import (TOKEN_POOLING_TYPES, PoolingAccumulator,
                                          classification_activation, classification_head,
                                          embedding_head, step_pooling_select)

logger = logging.getLogger(__name__)

# Tasks vLLM's pooling requests carry, by what the model is converted to.
_EMBED_TASKS = ("embed", "token_embed")
_CLASSIFY_TASKS = ("classify", "token_classify")


@dataclasses.dataclass(frozen=True)
class PoolingSetup:
    """What the runner needs to pool: the sequence pooling type (LAST, MEAN, CLS), the
    classification layer [labels, D] (classify models) and its activation, and the token
    pooling type of the per-token tasks (ALL, or STEP for process reward models)."""

    seq_pooling_type: str
    score_weight: np.ndarray | None = None
    activation: str = "sigmoid"
    # Encoder-only (bidirectional) attention: each prompt must be computed whole in one step.
    whole_prompts: bool = False
    tok_pooling_type: str = "ALL"

    @property
    def tasks(self) -> tuple[str, ...]:
        return _CLASSIFY_TASKS if self.score_weight is not None else _EMBED_TASKS


def pooling_setup(model_config, score_weight: np.ndarray | None) -> PoolingSetup:
    """The setup from vLLM's model config (pooler_config, --convert), refusing at start-up
    what would otherwise be served wrong."""
    pooler = model_config.pooler_config
    seq_type = pooler.seq_pooling_type or "LAST"
    if seq_type not in ("LAST", "MEAN", "CLS"):
        raise ValueError(f"xla-inference: sequence pooling type {seq_type!r} is not served")
    tok_type = pooler.tok_pooling_type or "ALL"
    if tok_type not in TOKEN_POOLING_TYPES:
        raise ValueError(f"xla-inference: token pooling type {tok_type!r} is not served")
    if pooler.logit_mean is not None or pooler.logit_sigma is not None:
        raise ValueError("xla-inference does not apply logit_mean / logit_sigma calibration")
    convert = str(getattr(model_config, "convert_type", "none"))
    hf = model_config.hf_config
    classify = convert == "classify" or any(a.endswith("ForSequenceClassification")
                                            for a in (hf.architectures or []))
    if model_config.attn_type == "encoder_only" and classify:
        raise ValueError("xla-inference serves encoder-only (bidirectional) models as embedders "
                         "only; cross-encoders and classifiers on them (BERT-style "
                         "*ForSequenceClassification rerankers) are not served yet")
    if classify:
        if score_weight is None:
            raise ValueError("xla-inference: a classification model needs the checkpoint's "
                             "score layer (score.weight, a *ForSequenceClassification "
                             "checkpoint); converting a causal LM to classify is not served")
        st = getattr(hf, "sentence_transformers", None) or {}
        if "activation_fn" in st or getattr(hf, "sbert_ce_default_activation_function", None):
            raise ValueError("xla-inference does not apply a sentence-transformers "
                             "activation_fn to classification outputs")
        if tok_type == "STEP" and pooler.returned_token_ids:
            raise ValueError(STEP_COLUMNS_OF_A_CLASSIFIER)
        activation = classification_activation(getattr(hf, "problem_type", None),
                                               score_weight.shape[0])
        return PoolingSetup(seq_type, score_weight, activation, tok_pooling_type=tok_type)
    return PoolingSetup(seq_type, whole_prompts=model_config.attn_type == "encoder_only",
                        tok_pooling_type=tok_type)


# vLLM's STEP pooler takes the columns before the head: on a classification model, columns
# of the hidden state, which its score layer then cannot take (vLLM fails on the shape).
STEP_COLUMNS_OF_A_CLASSIFIER = (
    "xla-inference does not serve STEP pooling's returned_token_ids on a classification "
    "model: vLLM selects those columns of the hidden state before the score layer, which "
    "then no longer fits it; leave returned_token_ids unset (every label's score at the "
    "step tokens)")


class PoolingRequests:
    """Each pooling request's accumulator (chunked prompts), and the step's outputs."""

    def __init__(self, setup: PoolingSetup):
        self.setup = setup
        self.states: dict[str, tuple] = {}  # req id -> (PoolingParams, PoolingAccumulator)

    def add(self, req_id: str, params, num_prompt_tokens: int) -> None:
        task = params.task
        if task not in self.setup.tasks:
            raise ValueError(f"xla-inference: pooling task {task!r} is not served by this "
                             f"model (it serves {', '.join(self.setup.tasks)})")
        if task == "token_classify" and getattr(params, "returned_token_ids", None):
            raise ValueError(STEP_COLUMNS_OF_A_CLASSIFIER)
        kind = self.setup.tok_pooling_type if task.startswith("token_") else \
            self.setup.seq_pooling_type
        self.states[req_id] = (params, PoolingAccumulator(kind, num_prompt_tokens))

    def restart(self, req_id: str) -> None:
        """A preempted request resumed: its prompt is computed anew."""
        params, acc = self.states[req_id]
        self.states[req_id] = (params, PoolingAccumulator(acc.pooling_type, acc.num_prompt_tokens))

    def remove(self, req_id: str) -> None:
        self.states.pop(req_id, None)

    def step_outputs(self, scheduled, pooled, hidden) -> list:
        """pooler_output for one step: a tensor per request whose prompt completed, None
        for one still in progress. scheduled: [(RequestState, num_new)]; pooled: the
        engine's [3, B, D] rows; hidden: its [T, D] states (read only for ALL and STEP)."""
        pooled = np.asarray(pooled)
        wants_all = any(self.states[req.req_id][1].pooling_type in TOKEN_POOLING_TYPES
                        for req, _ in scheduled)
        hidden = np.asarray(hidden) if wants_all else None
        outputs, offset = [], 0
        for row, (req, num_new) in enumerate(scheduled):
            params, acc = self.states[req.req_id]
            if self.setup.whole_prompts and (req.num_computed_tokens, num_new) != (
                    0, acc.num_prompt_tokens):
                raise ValueError(
                    f"request {req.req_id}: an encoder-only model attends over the whole "
                    f"prompt at once, but tokens {req.num_computed_tokens} to "
                    f"{req.num_computed_tokens + num_new} of {acc.num_prompt_tokens} were "
                    "scheduled (chunked prefill or prefix caching, which vLLM turns off for "
                    "these models)")
            per_token = acc.pooling_type in TOKEN_POOLING_TYPES
            rows = hidden[offset:offset + num_new] if per_token else None
            vec = acc.add(req.num_computed_tokens, num_new, pooled[0, row], pooled[1, row],
                          pooled[2, row], rows)
            if vec is not None and acc.pooling_type == "STEP":
                vec = step_pooling_select(vec, req.token_ids[:acc.num_prompt_tokens],
                                          params.step_tag_id, params.returned_token_ids)
            offset += num_new
            outputs.append(None if vec is None else torch.from_numpy(
                np.array(self._head(vec, params), np.float32)))
        return outputs

    def _head(self, vec: np.ndarray, params) -> np.ndarray:
        use_activation = params.use_activation is not False
        if self.setup.score_weight is not None:
            return classification_head(vec, self.setup.score_weight,
                                       self.setup.activation if use_activation else None)
        return embedding_head(vec, params.dimensions, use_activation)
