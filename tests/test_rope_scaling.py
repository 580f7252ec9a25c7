"""Rope scaling (linear, dynamic NTK, llama3, yarn) against transformers: tiny random Llama
models (Qwen2 for yarn), sequences past the pretraining context the scaling stretches;
logits within 1e-4, full pass and step by step through the cache (plain and `fast.prepare`d),
greedy tokens identical to `model.generate`. No downloads.

Dynamic NTK recomputes its frequencies from the length so far: llmcli from each row's own
length, which is transformers decoding that row alone (its batched generate takes the batch's
longest row and keeps the grown frequencies on the module between calls). So dynamic is held
to transformers one row at a time, with the module's state reset before each row."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_convert import N_INPUTS, hf_generate, ids_only, ours_generate, random_ids, randomize  # noqa: E402
from test_families import rewrite_config  # noqa: E402

from llmcli import fast  # noqa: E402
from llmcli.cache import PAD_TOKEN  # noqa: E402
from llmcli.config import ModelConfig  # noqa: E402
from llmcli.convert import convert_weights  # noqa: E402
from llmcli.errors import UserError  # noqa: E402

SIZES = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=96, bos_token_id=1, eos_token_id=2, pad_token_id=None)  # fmt: skip
# type -> (transformers class, max_position_embeddings, rope_parameters as transformers 5 writes them)
SCALINGS = {
    "linear": ("Llama", 16, {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0}),
    "dynamic": ("Llama", 16, {"rope_type": "dynamic", "factor": 3.0, "rope_theta": 1000.0}),
    "llama3": ("Llama", 64, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 16, "rope_theta": 10000.0}),
    "yarn": ("Qwen2", 64, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}),
}  # fmt: skip
EOS = 2
LONG = (18, 27)  # prompt lengths, past every original context above (16)


def build(kind: str, directory) -> None:
    torch.manual_seed(0)
    family, max_positions, params = SCALINGS[kind]
    cfg = getattr(transformers, f"{family}Config")(**SIZES, max_position_embeddings=max_positions,
                                                   rope_parameters=dict(params), tie_word_embeddings=False)  # fmt: skip
    model = getattr(transformers, f"{family}ForCausalLM")(cfg)
    randomize(model, EOS, 2.0)
    model.save_pretrained(directory)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cache = {}

    def get(kind):
        if kind not in cache:
            d = tmp_path_factory.mktemp(kind)
            build(kind, d)
            arch = json.loads((d / "config.json").read_text())["architectures"][0]
            cache[kind] = (d, getattr(transformers, arch).from_pretrained(d).eval())
        return cache[kind]

    return get


def reset_rotary(hf) -> None:
    """Dynamic NTK's frequencies as freshly loaded (transformers keeps grown ones between calls)."""
    rot = hf.model.rotary_emb
    rot.register_buffer("inv_freq", rot.original_inv_freq.clone(), persistent=False)
    rot.max_seq_len_cached = rot.original_max_seq_len


def hf_steps(hf, row: list[int], first: int) -> torch.Tensor:
    """transformers' last-position logits for `row` alone: row[:first] in one call, then a token at a time."""
    reset_rotary(hf)
    out = hf(input_ids=torch.tensor([row[:first]]), use_cache=True)
    name = "cache" if "cache" in out else "past_key_values"  # transformers 5.2x renamed it
    logits = [out.logits[0, -1]]
    for t in range(first, len(row)):
        out = hf(input_ids=torch.tensor([[row[t]]]), use_cache=True, **{name: out[name]})
        logits.append(out.logits[0, -1])
    return torch.stack(logits)  # (len(row) - first + 1, V)


def test_configs_carry_the_scaling(models):
    cfgs = {k: convert_weights(models(k)[0]).cfg for k in SCALINGS}
    assert (cfgs["linear"].rope_scaling, cfgs["linear"].rope_factor) == ("linear", 2.0)
    assert (cfgs["dynamic"].rope_scaling, cfgs["dynamic"].rope_original_max_positions) == ("dynamic", 16)
    c = cfgs["llama3"]
    assert (c.rope_scaling, c.rope_factor, c.rope_original_max_positions, c.rope_high_freq_factor) == ("llama3", 8.0, 16, 4.0)
    c = cfgs["yarn"]
    assert (c.rope_scaling, c.rope_factor, c.rope_original_max_positions, c.rope_attention_factor) == ("yarn", 4.0, 16, None)
    for c in cfgs.values():
        assert ModelConfig.from_json(c.to_json()) == c


@pytest.mark.parametrize("kernels", ["plain", "fast"])
@pytest.mark.parametrize("kind", list(SCALINGS))
def test_logits_match_transformers_full_and_step_by_step(models, kind, kernels, monkeypatch):
    d, hf = models(kind)
    ours = convert_weights(d)
    if kernels == "fast":
        monkeypatch.setattr(fast, "ONEDNN_MIN_WEIGHT", 1)
        fast.prepare(ours)
    rows = [r[:n] for r, n in zip(random_ids(4, 96, 3, {1, 2}, seed=5, lengths=(28, 29)), (10, 17, 24, 28))]
    width, shortest = max(map(len, rows)), min(map(len, rows))
    assert width > 16 + 4 and shortest < 16
    left = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    lmask = torch.tensor([[j >= width - len(r) for j in range(width)] for r in rows])
    with torch.inference_mode():
        # a left-padded batch: the padding and the shortest row's first token in one call, then a token at a time
        first = width - shortest + 1
        cache = ours.new_cache(4)
        steps = [ours.step(left[:, :first].masked_fill(~lmask[:, :first], PAD_TOKEN), cache)]
        steps += [ours.step(left[:, t : t + 1], cache) for t in range(first, width)]
        mine = torch.stack(steps, 1)  # (B, width - first + 1, V)
        for i, r in enumerate(rows):
            theirs = hf_steps(hf, r, first - (width - len(r)))
            torch.testing.assert_close(mine[i], theirs, atol=1e-4, rtol=0)
        # a full pass, longer than the original context
        full = torch.tensor([r[:24] for r in random_ids(3, 96, 3, {1, 2}, seed=6, lengths=(24, 25))])
        reset_rotary(hf)
        theirs = hf(input_ids=full).logits
        torch.testing.assert_close(ours(full), theirs, atol=1e-4, rtol=0)
        # the scaling is seen: without it the same weights give other logits past the first positions
        plain = type(ours)(ours.cfg.replace(**{f.name: f.default for f in dataclasses.fields(ModelConfig)
                                                if f.name.startswith("rope_") and f.name != "rope_theta"})).eval()  # fmt: skip
        plain.load_state_dict(convert_weights(d).state_dict())
        assert (plain(full) - theirs).abs().max() > 1e-2


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_greedy_matches_transformers_generate(models, kind):
    d, hf = models(kind)
    loaded = ids_only(d)
    rows = random_ids(N_INPUTS, 96, 3, {1, 2}, seed=11, lengths=(10, 22))
    search = dict(num_beams=1)
    mine = ours_generate(loaded, rows, search)
    if kind == "dynamic":  # one row at a time (see the module's docstring)
        theirs = []
        for r in rows:
            reset_rotary(hf)
            theirs += hf_generate(hf, [r], search)
    else:
        theirs = hf_generate(hf, rows, search)
    assert mine == theirs
    assert len({len(t) for t in theirs}) > 1 and len({tuple(t) for t in theirs}) > N_INPUTS // 2


def test_transformers_4_files_convert_to_the_same_model(models, tmp_path):
    for kind in SCALINGS:
        d = models(kind)[0]

        def change(config):
            params = config.pop("rope_parameters")
            config["rope_theta"] = params.pop("rope_theta")
            params["type"] = params.pop("rope_type")
            config["rope_scaling"] = params

        rewrite_config(d, tmp_path / kind, change)
        assert convert_weights(tmp_path / kind).cfg == convert_weights(d).cfg


@pytest.mark.parametrize(
    "params, message",
    [
        ({"rope_type": "su", "rope_theta": 1e4}, "'su'"),
        ({"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}, "'longrope'"),
        ({"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}, "'low_freq_factor'"),
        ({"rope_type": "linear", "rope_theta": 1e4}, "'factor'"),
    ],
)
def test_an_unknown_or_incomplete_scaling_is_one_line(models, tmp_path, params, message):
    rewrite_config(models("linear")[0], tmp_path / "m", lambda c: c.update(rope_parameters=params))
    with pytest.raises(UserError) as e:
        convert_weights(tmp_path / "m")
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(rope_scaling="ntk"), "rope_scaling='ntk' is not one of"),
        (dict(rope_factor=2.0), "rope_factor=2.0 unused with rope_scaling='none'"),
        (dict(rope_scaling="llama3", rope_factor=8.0, rope_beta_fast=16.0, rope_original_max_positions=8), "rope_beta_fast"),
        (dict(rope_scaling="yarn", rope_factor=4.0), "rope_original_max_positions"),
        (dict(rope_scaling="linear", rope_factor=0.0), "rope_factor=0.0 must be positive"),
        (dict(rope_scaling="linear", rope_factor=2.0, positions="learned"), "needs positions='rope'"),
    ],
)
def test_bad_scaling_fields_are_one_line(fields, message):
    base = dict(architecture="decoder-only", n_encoder_layers=0, positions="rope", d_model=32, n_heads=2, d_ff=64)
    with pytest.raises(UserError) as e:
        ModelConfig(**{**base, **fields})
    assert message in str(e.value) and "\n" not in str(e.value)
