import dataclasses

import pytest

from llmcli.config import PRESETS, ModelConfig, preset
from llmcli.errors import UserError


def test_json_round_trip_of_every_field():
    cfg = ModelConfig(architecture="decoder-only", n_encoder_layers=0, positions="rope", n_kv_heads=2, glu=True,
                      activation="silu", norm="rmsnorm", bias=False, attention_scale=None, decoder_start_id=None)  # fmt: skip
    again = ModelConfig.from_json(cfg.to_json())
    assert again == cfg
    assert {f.name for f in dataclasses.fields(ModelConfig)} == set(cfg.to_dict())


@pytest.mark.parametrize("name", PRESETS)
def test_presets_are_valid(name):
    assert preset(name).d_model > 0
    lm = preset(name, architecture="decoder-only")
    assert lm.n_encoder_layers == 0 and lm.positions == "rope"
    assert (lm.norm_position, lm.final_norm) == ("pre", True)  # post-norm was measured on translation only


def test_the_recipes_preset_is_post_norm_unless_set():
    assert (preset("small").norm_position, preset("small").final_norm) == ("post", False)
    # rotary positions in both stacks of the recipe's model; the demo's keeps sinusoids
    assert (preset("small").positions, preset("tiny").positions) == ("rope", "sinusoidal")
    assert (preset("small", norm_position="pre").norm_position, preset("small", norm_position="pre").final_norm) == ("pre", True)
    assert preset("tiny", norm_position="post").final_norm is False  # a post-norm stack ends in a norm already
    assert preset("tiny", norm_position="post", final_norm=True).final_norm is True
    assert preset("small", architecture="decoder-only", norm_position="post").norm_position == "post"


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(n_heads=12, d_model=1000), "n_heads=12 does not divide d_model=1000"),
        (dict(norm="batchnorm"), "norm='batchnorm' is not one of"),
        (dict(positions="alibi"), "positions='alibi'"),
        (dict(d_model="512"), "d_model='512' should be of type int"),
        (dict(dropout=1.5), "dropout"),
        (dict(n_kv_heads=3), "n_kv_heads=3 must divide n_heads=8"),
        (dict(architecture="decoder-only"), "n_encoder_layers=0"),
        (dict(tgt_vocab_size=100), "shared_embeddings needs one vocabulary"),
        (dict(eos_id=9000), "eos_id=9000 is outside the vocabulary"),
        (dict(vocab_size=0), "vocab_size=0 must be positive"),
    ],
)
def test_invalid_fields_are_named(fields, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig(**fields)


def test_unknown_keys_and_bad_json_are_one_line_errors():
    with pytest.raises(UserError, match="unknown field.*colour"):
        ModelConfig.from_dict({"colour": "blue"})
    with pytest.raises(UserError, match="unknown field.*colour"):  # what `llmcli train --set colour=1` gives
        preset("small", colour=1)
    with pytest.raises(UserError, match="not valid JSON"):
        ModelConfig.from_json("{nope")
    with pytest.raises(UserError, match="expected a JSON object"):
        ModelConfig.from_json("[1, 2]")


def test_derived_values_are_properties_not_fields():
    cfg = ModelConfig(d_model=512, n_heads=8)
    assert cfg.head_dim == 64 and cfg.kv_heads == 8 and cfg.output_vocab_size == cfg.vocab_size
    assert "head_dim" not in cfg.to_dict()
