"""DecodeSettings: checked when made, and filled user > model > task > base."""

import types

import pytest

from llmcli.errors import UserError
from llmcli.tasks import BASE_DEFAULTS, TASK_DEFAULTS, DecodeSettings, with_defaults


def loaded_with(decode: dict):
    return types.SimpleNamespace(generation={"decode": decode})


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(beam_size=0), "--beam 0 must be at least 1"),
        (dict(n_best=3, beam_size=2), "--n-best 3 needs --beam of at least 3"),
        (dict(chunk_lines=0), "--chunk-lines 0 must be at least 1"),
        (dict(top_p=1.5), "--top-p 1.5 must be in (0, 1]"),
        (dict(temperature=0.0), "--temperature 0.0 must be above 0"),
        (dict(on_long="wrap"), "--on-long 'wrap' is not truncate, error or skip"),
        (dict(no_repeat_ngram_size=-1), "--no-repeat-ngram -1 must be at least 0"),
        (dict(early_stopping="sometimes"), "--early-stopping 'sometimes' is not true, false or never"),
    ],
)
def test_bad_settings_are_refused_when_made(fields, message):
    with pytest.raises(UserError) as e:
        DecodeSettings(**fields)
    assert str(e.value) == message


def test_given_is_what_is_not_none():
    assert DecodeSettings().given == frozenset()
    assert DecodeSettings(beam_size=1, top_k=0, sample=False).given == {"beam_size", "top_k", "sample"}


def test_the_user_then_the_model_then_the_task_then_the_base():
    model = loaded_with({"beam_size": 6, "length_penalty": 0.6, "no_repeat_ngram_size": 2})
    filled = with_defaults(DecodeSettings(length_penalty=1.5), model, "summarize")
    assert filled.length_penalty == 1.5  # given
    assert filled.beam_size == 6 and filled.no_repeat_ngram_size == 2  # the model's, over the task's 4 and 3
    assert filled.max_len == TASK_DEFAULTS["summarize"]["max_len"] and filled.batch_tokens == 8192  # the task's
    assert filled.temperature == BASE_DEFAULTS["temperature"] and filled.on_long == "truncate"  # the base
    assert with_defaults(DecodeSettings(), loaded_with({}), "translate").max_len is None  # a x source + b


def test_sampling_ignores_the_models_beam_and_greedy_keeps_it():
    model = loaded_with({"beam_size": 4})
    sampled = with_defaults(DecodeSettings(), model, "generate")
    assert sampled.sample and sampled.beam_size == 1 and sampled.top_k == 50
    greedy = with_defaults(DecodeSettings(sample=False), model, "generate")
    assert not greedy.sample and greedy.beam_size == 4


def test_a_combination_is_checked_after_filling():
    with pytest.raises(UserError, match="--n-best 5 needs --beam of at least 5"):
        with_defaults(DecodeSettings(n_best=5), loaded_with({}), "translate")  # the task's beam is 4


def test_a_model_opened_for_a_task_runs_the_fast_kernels_and_one_opened_to_read_does_not(tiny_model):
    from torch import nn

    from llmcli import fast
    from llmcli.model import Attention
    from llmcli.tasks import open_model

    for_task, to_read = open_model(str(tiny_model), "translate"), open_model(str(tiny_model))
    assert {type(m) for m in for_task.model.modules()} >= {fast.PackedLinear, fast.OneQueryAttention}
    assert not any(type(m) is nn.Linear or type(m) is Attention for m in for_task.model.modules())
    assert not any(isinstance(m, (fast.PackedLinear, fast.OneQueryAttention)) for m in to_read.model.modules())
    assert for_task.model.state_dict().keys() == to_read.model.state_dict().keys()
