"""Gemma 2, Gemma 3 (text) and Phi-3 with longrope on llmcli's core: tiny random `transformers`
models (fixed seed, save_pretrained, tokenizers trained here), converted and held to
transformers' logits (1e-4, a left-padded batch, full and step by step through the cache, plain
and `fast.prepare`d) and to `model.generate`'s greedy and beam-4 tokens; then the CLI on text.

Gemma's sliding window (4) is shorter than every sequence decoded, its soft-caps low enough to
bite. Phi-3's longrope switches from the short to the long factors once a sequence passes
`original_max_position_embeddings` (8 here): transformers' generate then recomputes the whole
cache on the long factors, from the batch's longest row; llmcli from each row's own length,
which is transformers decoding that row alone. So the switch is held to transformers row by
row, and batched generate on prompts all past 8 tokens (padded) or all of one length (crossing
8 in the same step). A multimodal Gemma 3 file (tiny SigLIP beside the text model) converts to its
text model. No downloads."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_convert import (  # noqa: E402
    N_INPUTS,
    hf_generate,
    hf_text,
    ids_only,
    ours_generate,
    random_ids,
    randomize,
    run,
    save_tokenizer,
    sentences,
    special_ids,
    train_bpe,
)
from test_families import rewrite_config  # noqa: E402
from tokenizers import processors  # noqa: E402

from llmcli import fast  # noqa: E402
from llmcli.cache import PAD_TOKEN  # noqa: E402
from llmcli.config import ModelConfig  # noqa: E402
from llmcli.convert import convert_weights  # noqa: E402
from llmcli.errors import UserError  # noqa: E402

FAMILIES = ["gemma2", "gemma3", "phi3"]  # phi3: longrope
WINDOW = 4  # Gemma's sliding window: prompts run to 9 tokens, outputs to 10 more
ORIGINAL = 8  # Phi-3's original_max_position_embeddings: longrope's switch
SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64)  # fmt: skip
GEMMA = dict(SIZES, head_dim=16, pad_token_id=0, eos_token_id=1, bos_token_id=2, hidden_activation="gelu_pytorch_tanh",
             query_pre_attn_scalar=8, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])  # fmt: skip
LONGROPE = {"rope_type": "longrope", "rope_theta": 500.0, "short_factor": [1.0, 1.3, 2.0, 3.0],
            "long_factor": [1.5, 2.5, 6.0, 11.0]}  # fmt: skip


def build(family: str, directory):
    """Save a tiny random `family` model and its tokenizer to `directory`; return the HF tokenizer."""
    torch.manual_seed(0)
    if family in ("gemma2", "gemma3", "gemma3-vision"):
        tok = train_bpe("metaspace", ["<pad>", "<eos>", "<bos>", "<unk>"])
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
        if family == "gemma2":
            cfg = transformers.Gemma2Config(**GEMMA, vocab_size=tok.get_vocab_size(), attn_logit_softcapping=3.0,
                                            final_logit_softcapping=15.0)  # fmt: skip
            model = transformers.Gemma2ForCausalLM(cfg)
        else:  # the local layer's own base; linear scaling on the global layer only
            rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                    "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0}}  # fmt: skip
            cfg = transformers.Gemma3TextConfig(**GEMMA, vocab_size=tok.get_vocab_size(), final_logit_softcapping=15.0,
                                                rope_parameters=rope)  # fmt: skip
            if family == "gemma3-vision":  # the multimodal model, a tiny SigLIP beside the text model
                vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                              patch_size=14)  # fmt: skip
                V = tok.get_vocab_size()
                mm = transformers.Gemma3Config(text_config=cfg.to_dict(), vision_config=vision, mm_tokens_per_image=4,
                                               boi_token_index=V - 3, eoi_token_index=V - 2, image_token_index=V - 1)  # fmt: skip
                model = transformers.Gemma3ForConditionalGeneration(mm)
            else:
                model = transformers.Gemma3ForCausalLM(cfg)
        hf_tok = save_tokenizer(tok, directory, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
        eos = 1
    elif family == "phi3":
        tok = train_bpe("metaspace", ["<unk>", "<s>", "</s>"])
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        cfg = transformers.Phi3Config(**SIZES, vocab_size=tok.get_vocab_size(), bos_token_id=1, eos_token_id=2,
                                      pad_token_id=0, tie_word_embeddings=False, original_max_position_embeddings=ORIGINAL,
                                      rope_parameters=dict(LONGROPE))  # fmt: skip
        model = transformers.Phi3ForCausalLM(cfg)
        hf_tok = save_tokenizer(tok, directory, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
        eos = 2
    else:
        raise ValueError(family)
    randomize(model, eos, 3.0 if family != "phi3" else 2.0)  # Gemma: against the soft-capped logits
    with torch.no_grad():  # norm weights off their init, so each one is tested (Gemma scales by 1 + weight)
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0, 0.3) if family != "phi3" else p.uniform_(0.5, 1.5)
    model.save_pretrained(directory)
    return hf_tok


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """family -> (directory, HF model reloaded from it, HF tokenizer), built once per module."""
    cache = {}

    def get(family):
        if family not in cache:
            d = tmp_path_factory.mktemp(family)
            hf_tok = build(family, d)
            architecture = json.loads((d / "config.json").read_text())["architectures"][0]
            cache[family] = (d, getattr(transformers, architecture).from_pretrained(d).eval(), hf_tok)
        return cache[family]

    return get


# ---------------------------------------------------------------- the mapping


def test_configs_map_to_the_fields_each_family_needs(hf_models):
    models = {f: convert_weights(hf_models(f)[0]) for f in FAMILIES}
    cfgs = {f: m.cfg for f, m in models.items()}
    g2, g3, phi = cfgs["gemma2"], cfgs["gemma3"], cfgs["phi3"]
    assert (g2.norm_position, g2.norm_weight_offset, g2.scale_embeddings, g2.attention_scale) == ("sandwich", 1.0, True, 8**-0.5)
    assert (g2.attention_softcap, g2.logits_softcap, g2.sliding_window, g2.layer_kinds) == (
        3.0,
        15.0,
        WINDOW,
        ("sliding", "full"),
    )
    assert not g2.qk_norm and g2.rope_local_theta is None
    assert g3.qk_norm and g3.attention_softcap is None and g3.logits_softcap == 15.0 and g3.layer_kinds == ("sliding", "full")
    assert (g3.rope_theta, g3.rope_local_theta, g3.rope_scaling, g3.rope_factor) == (1000.0, 100.0, "linear", 2.0)
    assert (phi.rope_scaling, phi.rope_original_max_positions, phi.rope_factor) == ("longrope", ORIGINAL, 64 / ORIGINAL)
    assert phi.rope_short_factor == tuple(LONGROPE["short_factor"]) and phi.rope_long_factor == tuple(LONGROPE["long_factor"])
    for model in models.values():  # the parameter count without building; config.json's round trip (lists back to tuples)
        assert model.cfg.n_parameters == model.num_parameters()
        assert ModelConfig.from_json(model.cfg.to_json()) == model.cfg


# ---------------------------------------------------------------- logits


def padded(rows: list[list[int]]):
    width = max(map(len, rows))
    left = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    lmask = torch.tensor([[j >= width - len(r) for j in range(width)] for r in rows])
    return left, lmask


@pytest.mark.parametrize("kernels", ["plain", "fast"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_full_and_step_by_step(hf_models, family, kernels, monkeypatch):
    """A left-padded batch: the padding and the first tokens in one call, then a token at a time;
    and a full pass. Phi-3's rows are all past ORIGINAL from the first call on (the long factors
    throughout, in transformers' batch as in each row); its switch is the test below."""
    d, hf, _ = hf_models(family)
    ours = convert_weights(d)
    if kernels == "fast":  # every linear layer packed however small, one-query attention in the steps
        monkeypatch.setattr(fast, "ONEDNN_MIN_WEIGHT", 1)
        fast.prepare(ours)
    lengths, before = ((12, 18), ORIGINAL + 1) if family == "phi3" else ((7, 15), 1)
    rows = random_ids(4, ours.cfg.vocab_size, 3, special_ids(hf), seed=5, lengths=lengths)
    left, lmask = padded(rows)
    width, shortest = left.shape[1], min(map(len, rows))
    assert shortest > WINDOW + 1
    positions = (lmask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        theirs = hf(input_ids=left, attention_mask=lmask.long(), position_ids=positions).logits
        first = width - shortest + before
        cache = ours.new_cache(4)
        steps = [ours.step(left[:, :first].masked_fill(~lmask[:, :first], PAD_TOKEN), cache)]
        steps += [ours.step(left[:, t : t + 1], cache) for t in range(first, width)]
        torch.testing.assert_close(torch.stack(steps, 1), theirs[:, first - 1 :], atol=1e-4, rtol=0)
        full = torch.tensor([r[:shortest] for r in rows])  # unpadded rows, past the window and ORIGINAL
        torch.testing.assert_close(ours(full), hf(input_ids=full).logits, atol=1e-4, rtol=0)


def test_longrope_switch_matches_transformers_row_by_row(hf_models, monkeypatch):
    """Rows of 3, 6 and 9 tokens decoded past ORIGINAL (with the kernels decoding runs): each step's
    logits are transformers' on that row alone (a full pass on the row so far, short factors up to
    ORIGINAL tokens, long after), the row's cache recomputed in the step that crosses."""
    d, hf, _ = hf_models("phi3")
    ours = convert_weights(d)
    monkeypatch.setattr(fast, "ONEDNN_MIN_WEIGHT", 1)
    fast.prepare(ours)
    rows = random_ids(3, ours.cfg.vocab_size, 3, special_ids(hf), seed=9, lengths=(20, 21))
    prompts = [r[:n] for r, n in zip(rows, (3, 6, 9), strict=True)]
    left, lmask = padded(prompts)
    with torch.inference_mode():
        cache = ours.new_cache(3)
        steps = [ours.step(left.masked_fill(~lmask, PAD_TOKEN), cache)]
        steps += [ours.step(torch.tensor([[r[len(p) + t]] for r, p in zip(rows, prompts, strict=True)]), cache)
                  for t in range(8)]  # fmt: skip
        for i, (r, p) in enumerate(zip(rows, prompts, strict=True)):
            alone = torch.stack([hf(input_ids=torch.tensor([r[:n]])).logits[0, -1] for n in range(len(p), len(p) + 9)])
            torch.testing.assert_close(torch.stack([s[i] for s in steps]), alone, atol=1e-4, rtol=0)
    # the same weights without the long factors give other logits past ORIGINAL: the switch is seen
    no_switch = type(ours)(ours.cfg.replace(rope_long_factor=ours.cfg.rope_short_factor)).eval()
    no_switch.load_state_dict(ours.state_dict())
    with torch.inference_mode():
        x = torch.tensor([rows[0][:12]])
        assert (no_switch(x)[0, -1] - ours(x)[0, -1]).abs().max() > 1e-2


def test_window_and_soft_caps_each_change_gemma_s_logits(hf_models):
    """Without the window, or either cap, the same weights give other logits: the tests above would
    see each one lost."""
    d, hf, _ = hf_models("gemma2")
    ours = convert_weights(d)
    tokens = torch.tensor([random_ids(1, ours.cfg.vocab_size, 3, special_ids(hf), seed=7, lengths=(12, 13))[0]])
    with torch.inference_mode():
        base = ours(tokens)
        for change in (dict(layer_kinds=None, sliding_window=None), dict(attention_softcap=None), dict(logits_softcap=None)):
            other = type(ours)(ours.cfg.replace(**change)).eval()
            other.load_state_dict(ours.state_dict())
            assert (other(tokens) - base).abs().max() > 1e-2, change


# ---------------------------------------------------------------- generate, token for token

# phi3-long: padded prompts, all past ORIGINAL; phi3-cross: 24 prompts of 5 tokens, crossing together
CASES = {"gemma2": ("gemma2", (2, 9)), "gemma3": ("gemma3", (2, 9)), "phi3-long": ("phi3", (9, 16)),
         "phi3-cross": ("phi3", (5, 6))}  # fmt: skip
BEAM_LENGTH_PENALTY = {"gemma2": 0.6, "gemma3": 0.6, "phi3-long": 0.6, "phi3-cross": 1.2}


@pytest.mark.parametrize("search", ["greedy", "beam"])
@pytest.mark.parametrize("case", list(CASES))
def test_generate_matches_transformers_token_for_token(hf_models, case, search):
    family, lengths = CASES[case]
    d, hf, _ = hf_models(family)
    loaded = ids_only(d)
    rows = random_ids(N_INPUTS, loaded.config.vocab_size, 3, special_ids(hf), seed=11, lengths=lengths)
    settings = dict(num_beams=1) if search == "greedy" else dict(num_beams=4, length_penalty=BEAM_LENGTH_PENALTY[case])
    theirs = hf_generate(hf, rows, settings)
    mine = ours_generate(loaded, rows, settings)
    assert mine == theirs, f"{sum(a == b for a, b in zip(mine, theirs))} of {len(rows)} identical"
    assert len({len(t) for t in theirs}) > 1, "outputs all of one length: a weak test"
    if case == "phi3-cross":  # the switch is taken within the outputs
        assert max(len(t) for t in theirs) + 5 > ORIGINAL


@pytest.mark.slow  # transformers' beam search a row at a time
def test_longrope_generate_on_mixed_lengths_is_transformers_row_by_row(hf_models):
    """Padded prompts of 2 to 8 tokens, each crossing ORIGINAL at its own step, beams reordered and
    rows finishing in between: beam-4 outputs are transformers' on each row alone (its batched
    generate switches every row on the longest one's length: 3 of 24 beam outputs identical on
    24 prompts drawn so)."""
    d, hf, _ = hf_models("phi3")
    loaded = ids_only(d)
    rows = random_ids(4, loaded.config.vocab_size, 3, special_ids(hf), seed=11, lengths=(2, 9))
    settings = dict(num_beams=4, length_penalty=1.2)
    mine = ours_generate(loaded, rows, settings)
    assert mine == [hf_generate(hf, [r], settings)[0] for r in rows]
    assert len({len(r) for r in rows}) > 2 and max(len(r) + len(m) for r, m in zip(rows, mine, strict=True)) > ORIGINAL


@pytest.mark.slow  # builds a vision tower too
def test_multimodal_gemma3_converts_to_its_text_model(hf_models):
    """A `gemma3` file (Gemma3ForConditionalGeneration): the text_config and the language model's
    tensors, the vision tower's dropped; logits and greedy tokens on text as transformers'."""
    d, hf, _ = hf_models("gemma3-vision")
    loaded = ids_only(d)
    assert loaded.config.layer_kinds == ("sliding", "full") and loaded.config.rope_local_theta == 100.0
    assert loaded.config.logits_softcap is None  # transformers' multimodal model applies none
    rows = random_ids(N_INPUTS, loaded.config.vocab_size - 3, 3, special_ids(hf.model.language_model), seed=11)
    left, lmask = padded(rows)
    positions = (lmask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        theirs = hf(input_ids=left, attention_mask=lmask.long(), position_ids=positions).logits[:, -1]
        mine = loaded.model.step(left.masked_fill(~lmask, PAD_TOKEN), loaded.model.new_cache(len(rows)))
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)
    hf.config.eos_token_id = hf.config.text_config.eos_token_id  # hf_generate reads the top-level config
    theirs = hf_generate(hf, rows, dict(num_beams=1))
    assert ours_generate(loaded, rows, dict(num_beams=1)) == theirs
    assert len({len(t) for t in theirs}) > 1, "outputs all of one length: a weak test"


# ---------------------------------------------------------------- the CLI on text


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_generate_matches_transformers(hf_models, family, tmp_path):
    d, hf, hf_tok = hf_models(family)
    texts = sentences(12, 22)
    if family == "phi3":  # prompts past ORIGINAL tokens, so that transformers' batch and each row agree
        texts = [f"{a} {b} {c}" for a, b, c in zip(texts, sentences(12, 23), sentences(12, 24), strict=True)]
        assert min(len(hf_tok(t)["input_ids"]) for t in texts) > ORIGINAL
    (tmp_path / "prompts.txt").write_text("\n".join(texts) + "\n")
    mine = run("generate", "-m", str(d), "--input", str(tmp_path / "prompts.txt"), "--greedy", "--max-new-tokens", "8", "-q")
    theirs = hf_text(hf_tok, hf, texts, max_new_tokens=8)
    assert mine == theirs
    assert len(set(mine)) >= 4


# ---------------------------------------------------------------- transformers 4.x files, and refusals


def as_4x(family: str):
    """config.json as transformers 4.x wrote it: no layer_types (Gemma 2's alternation, Gemma 3's
    sliding_window_pattern), rope_theta at the top (Gemma 3: rope_local_base_freq and the global
    layers' rope_scaling), Phi-3's longrope in rope_scaling under its old key "type"."""

    def change(config):
        params = config.pop("rope_parameters")
        config.pop("layer_types", None)
        if family == "gemma2":
            config.update(rope_theta=params["rope_theta"], hidden_act="gelu")
        elif family == "gemma3":
            full, local = params["full_attention"], params["sliding_attention"]
            config.update(rope_theta=full["rope_theta"], rope_local_base_freq=local["rope_theta"], sliding_window_pattern=2,
                          rope_scaling={"rope_type": "linear", "factor": full["factor"]})  # fmt: skip
        else:
            config.update(rope_theta=params["rope_theta"], rope_scaling={"type": "longrope", "short_factor": params["short_factor"],
                          "long_factor": params["long_factor"]})  # fmt: skip

    return change


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_4_config_files_convert_to_the_same_model(hf_models, family, tmp_path):
    d = hf_models(family)[0]
    rewrite_config(d, tmp_path / "old", as_4x(family))
    assert convert_weights(tmp_path / "old").cfg == convert_weights(d).cfg


@pytest.mark.parametrize(
    "family, change, message",
    [
        ("gemma2", lambda c: c.update(use_bidirectional_attention=True), "use_bidirectional_attention"),
        ("gemma2", lambda c: c.update(layer_types=["sliding_attention", "chunked_attention"]), "chunked_attention"),
        ("gemma3", lambda c: c["rope_parameters"]["sliding_attention"].update(rope_type="linear", factor=2.0),
         "sliding-window layers"),
        ("phi3", lambda c: c["rope_parameters"].update(rope_type="dynamic", factor=2.0), "'dynamic'"),
        ("phi3", lambda c: c["rope_parameters"].update(long_factor=[1.0, 2.0]), "long_factor"),
    ],
)  # fmt: skip
def test_an_unsupported_feature_is_one_line_naming_it(hf_models, tmp_path, family, change, message):
    rewrite_config(hf_models(family)[0], tmp_path / "m", change)
    with pytest.raises(UserError) as e:
        convert_weights(tmp_path / "m")
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(layer_kinds=("full",)), "layer_kinds has 1 entries"),
        (dict(layer_kinds=("sliding", "full")), "sliding_window is not set"),
        (dict(layer_kinds=("full", "local"), sliding_window=4), "layer_kinds='local'"),
        (dict(attention_softcap=0.0), "attention_softcap=0.0"),
        (dict(norm_position="sandwich", norm="layernorm", logits_softcap=-1.0), "logits_softcap=-1.0"),
        (dict(rope_scaling="longrope", rope_original_max_positions=8, rope_short_factor=(1.0,) * 4), "rope_long_factor"),
        (dict(rope_local_theta=-1.0), "rope_local_theta"),
    ],
)
def test_config_checks_name_field_and_value(fields, message):
    base = dict(architecture="decoder-only", n_encoder_layers=0, n_decoder_layers=2, d_model=32, n_heads=4,
                positions="rope", vocab_size=50)  # fmt: skip
    with pytest.raises(UserError) as e:
        ModelConfig(**base, **fields)
    assert message in str(e.value)
