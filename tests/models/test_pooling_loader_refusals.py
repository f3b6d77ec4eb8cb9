"""A sentence-transformers checkpoint whose modules.json lists a module the pooling runner
does not run (a Dense projector) is refused by name, never served without it."""

import json

import pytest

from xla_inference.models.pooling_loader import refuse_extra_sentence_transformer_modules


def _modules(tmp_path, types):
    (tmp_path / "modules.json").write_text(json.dumps(
        [{"idx": i, "name": str(i), "path": f"{i}_{t}", "type": f"sentence_transformers.models.{t}"}
         for i, t in enumerate(types)]))
    return tmp_path


def test_dense_projector_is_refused(tmp_path):
    with pytest.raises(ValueError, match="sentence_transformers.models.Dense"):
        refuse_extra_sentence_transformer_modules(_modules(tmp_path, ["Transformer", "Pooling",
                                                                      "Dense", "Normalize"]))


def test_served_modules_and_plain_checkpoints_pass(tmp_path):
    refuse_extra_sentence_transformer_modules(_modules(tmp_path, ["Transformer", "Pooling",
                                                                  "Normalize"]))
    refuse_extra_sentence_transformer_modules(tmp_path / "absent")
