"""The pooling runner's rules for encoder-only (bidirectional) models, without an engine: a
prompt must come whole in one step (a chunk would be attended without the rest of its
prompt), and a classifier / cross-encoder on such a model is refused by name."""

import types

import numpy as np
import pytest

from xla_inference.plugin.pooling import PoolingRequests, pooling_setup


def _model_config(attn_type, architectures, convert="none"):
    pooler = types.SimpleNamespace(seq_pooling_type="CLS", tok_pooling_type="ALL",
                                   logit_mean=None, logit_sigma=None)
    hf = types.SimpleNamespace(architectures=architectures)
    return types.SimpleNamespace(pooler_config=pooler, attn_type=attn_type, hf_config=hf,
                                 convert_type=convert)


def _request(num_computed):
    return types.SimpleNamespace(req_id="r0", num_computed_tokens=num_computed)


def _step(pooling, num_computed, num_new):
    pooled = np.ones((3, 4, 8), np.float32)  # last, first, sum rows of 4 request rows
    return pooling.step_outputs([(_request(num_computed), num_new)], pooled, None)


def test_encoder_only_prompts_pool_whole_and_refuse_a_chunk():
    setup = pooling_setup(_model_config("encoder_only", ["BertModel"]), None)
    assert setup.whole_prompts and setup.tasks == ("embed", "token_embed")
    params = types.SimpleNamespace(task="embed", dimensions=None, use_activation=None)
    whole = PoolingRequests(setup)
    whole.add("r0", params, 5)
    assert _step(whole, 0, 5)[0] is not None
    chunked = PoolingRequests(setup)
    chunked.add("r0", params, 5)
    with pytest.raises(ValueError, match=r"encoder-only .*tokens 0 to 3 of 5"):
        _step(chunked, 0, 3)


def test_decoder_pooling_keeps_chunks():
    setup = pooling_setup(_model_config("decoder", ["Qwen3ForCausalLM"]), None)
    assert not setup.whole_prompts


@pytest.mark.parametrize("architectures,convert", [(["BertForSequenceClassification"], "none"),
                                                   (["BertModel"], "classify")])
def test_classifiers_on_encoder_only_models_are_refused(architectures, convert):
    with pytest.raises(ValueError, match="cross-encoders and classifiers"):
        pooling_setup(_model_config("encoder_only", architectures, convert), None)
