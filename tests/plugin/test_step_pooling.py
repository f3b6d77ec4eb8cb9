"""STEP pooling's rules, without an engine: the start-up setup takes tok_pooling_type STEP
from vLLM's pooler config; returned_token_ids on a classification model is refused by name
at start-up and per request (vLLM would take those columns of the hidden state before the
score layer, which then no longer fits); other token pooling types are refused."""

import types

import numpy as np
import pytest

from xla_inference.plugin.pooling import PoolingRequests, pooling_setup


def _model_config(tok_pooling_type, architectures, returned_token_ids=None):
    pooler = types.SimpleNamespace(seq_pooling_type="LAST", tok_pooling_type=tok_pooling_type,
                                   logit_mean=None, logit_sigma=None,
                                   returned_token_ids=returned_token_ids)
    hf = types.SimpleNamespace(architectures=architectures, problem_type=None)
    return types.SimpleNamespace(pooler_config=pooler, attn_type="decoder", hf_config=hf,
                                 convert_type="none")


def test_step_setup_for_embedders_and_classifiers():
    assert pooling_setup(_model_config("STEP", ["Qwen3ForCausalLM"]), None).tok_pooling_type \
        == "STEP"
    score = np.ones((2, 8), np.float32)
    setup = pooling_setup(_model_config("STEP", ["LlamaForSequenceClassification"]), score)
    assert (setup.tok_pooling_type, setup.tasks) == ("STEP", ("classify", "token_classify"))
    assert pooling_setup(_model_config(None, ["Qwen3ForCausalLM"]), None).tok_pooling_type \
        == "ALL"


def test_returned_token_ids_on_a_classifier_are_refused():
    score = np.ones((2, 8), np.float32)
    with pytest.raises(ValueError, match="returned_token_ids on a classification model"):
        pooling_setup(_model_config("STEP", ["LlamaForSequenceClassification"], [0, 1]), score)
    setup = pooling_setup(_model_config("STEP", ["LlamaForSequenceClassification"]), score)
    params = types.SimpleNamespace(task="token_classify", step_tag_id=3, returned_token_ids=[1])
    with pytest.raises(ValueError, match="returned_token_ids"):
        PoolingRequests(setup).add("r0", params, 5)


def test_other_token_pooling_types_are_refused():
    with pytest.raises(ValueError, match="token pooling type 'SPLADE' is not served"):
        pooling_setup(_model_config("SPLADE", ["Qwen3ForCausalLM"]), None)


@pytest.mark.slow
@pytest.mark.vllm
def test_step_requests_pass_validation_except_columns_of_a_classifier():
    from vllm import PoolingParams
    from vllm.exceptions import VLLMValidationError

    from xla_inference.plugin.platform import _validate_pooling_request

    _validate_pooling_request(PoolingParams(task="token_embed", step_tag_id=3,
                                            returned_token_ids=[0, 2]))
    _validate_pooling_request(PoolingParams(task="token_classify", step_tag_id=3))
    with pytest.raises(VLLMValidationError, match="returned_token_ids"):
        _validate_pooling_request(PoolingParams(task="token_classify", returned_token_ids=[0]))
