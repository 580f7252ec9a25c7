"""M2M100 / NLLB-200 and Phi-3 on llmcli's core: tiny random `transformers` models (fixed seed,
save_pretrained, tokenizers built here), converted and held to transformers' logits (1e-4, a
padded batch, full and step by step) and to `model.generate`'s greedy and beam-4 tokens, the
target language forced first; then the CLI on text with --source-lang/--target-lang. No downloads."""

from __future__ import annotations

import json
from pathlib import Path

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
from tokenizers import processors  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from llmcli import tasks  # noqa: E402
from llmcli.cache import PAD_TOKEN  # noqa: E402
from llmcli.cli import app  # noqa: E402
from llmcli.convert import convert_weights  # noqa: E402
from llmcli.errors import UserError  # noqa: E402

NLLB_CODES = ["eng_Latn", "deu_Latn", "fra_Latn", "zho_Hans"]
M2M100_CODES = ["en", "de", "fr", "zh"]
FAMILIES = ["nllb", "m2m100", "phi3", "phi3-window"]  # phi3-window: sliding_window=4, shorter than the inputs


def _bpe_vocab(tok) -> tuple[dict, list]:
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in model["merges"]]
    return model["vocab"], merges


def build(family: str, d: Path):
    """A tiny random model of `family` and its tokenizer, saved to d; returns the HF tokenizer."""
    torch.manual_seed(0)
    if family in ("nllb", "m2m100"):
        if family == "nllb":  # NllbTokenizer from a BPE trained here: `[src_lang] X </s>`
            vocab, merges = _bpe_vocab(train_bpe("metaspace", ["<s>", "<pad>", "</s>", "<unk>"]))
            fast = transformers.NllbTokenizer(vocab=vocab, merges=merges, extra_special_tokens=NLLB_CODES, src_lang="eng_Latn")
            fast.save_pretrained(d)
        else:  # M2M100's layout, `__en__ X </s>`, as a tokenizer.json (transformers has no fast M2M100 tokenizer)
            tok = train_bpe("metaspace", ["<s>", "<pad>", "</s>", "<unk>"])
            tok.add_special_tokens([f"__{c}__" for c in M2M100_CODES])
            tok.post_processor = processors.TemplateProcessing(
                single="__en__ $A </s>", special_tokens=[("__en__", tok.token_to_id("__en__")), ("</s>", 2)]
            )
            fast = save_tokenizer(tok, d, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
        V = len(fast) + 3  # a model vocabulary larger than the tokenizer's
        cfg = transformers.M2M100Config(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2,
                                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                        decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                                        eos_token_id=2, decoder_start_token_id=2, scale_embedding=True,
                                        activation_function="relu")  # fmt: skip
        model = transformers.M2M100ForConditionalGeneration(cfg)
        randomize(model, 2, 2.5 if family == "nllb" else 3.0)
        if family == "m2m100":  # a constant push towards </s>, so that some outputs end early
            with torch.no_grad():
                eos = model.get_output_embeddings().weight[2]
                model.model.decoder.layer_norm.bias.copy_(0.8 * eos / eos.norm())
    elif family in ("phi3", "phi3-window"):
        tok = train_bpe("metaspace", ["<unk>", "<s>", "</s>"])
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        V = tok.get_vocab_size() + 5
        cfg = transformers.Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=V, max_position_embeddings=64, bos_token_id=1,
                                      eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                                      sliding_window=4 if family == "phi3-window" else None,
                                      rope_parameters={"rope_type": "default", "rope_theta": 500.0})  # fmt: skip
        model = transformers.Phi3ForCausalLM(cfg)
        fast = save_tokenizer(tok, d, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
        randomize(model, 2, 2.0)
    else:
        raise ValueError(family)
    model.save_pretrained(d)
    return fast


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            d = tmp_path_factory.mktemp(family)
            fast = build(family, d)
            arch = getattr(transformers, json.loads((d / "config.json").read_text())["architectures"][0])
            cache[family] = (d, arch.from_pretrained(d).eval(), fast)
        return cache[family]

    return get


def lang_id(fast, family: str, code: str) -> int:
    return fast.convert_tokens_to_ids(code if family == "nllb" else f"__{code}__")


# ---------------------------------------------------------------- logits


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_on_a_padded_batch(hf_models, family):
    d, hf, fast = hf_models(family)
    ours = convert_weights(d)
    V = ours.cfg.output_vocab_size
    rows = random_ids(4, V, 4, special_ids(hf), seed=5, lengths=(2, 12))
    width = max(map(len, rows))
    with torch.inference_mode():
        if ours.cfg.is_encoder_decoder:
            mask = torch.tensor([[j < len(r) for j in range(width)] for r in rows])
            src = torch.tensor([r + [1] * (width - len(r)) for r in rows])  # right-padded, as the tokenizer pads
            tgt = torch.tensor(random_ids(4, V, 4, special_ids(hf), seed=6, lengths=(9, 10)))
            theirs = hf(input_ids=src, attention_mask=mask.long(), decoder_input_ids=tgt).logits
            torch.testing.assert_close(ours(tgt, src, mask), theirs, atol=1e-4, rtol=0)
            cache = ours.new_cache(4, ours.encode(src, mask), mask)
            steps = torch.stack([ours.step(tgt[:, t : t + 1], cache) for t in range(tgt.shape[1])], 1)
            torch.testing.assert_close(steps, theirs, atol=1e-4, rtol=0)
        else:  # left padding, as generation pads prompts
            left = torch.tensor([[0] * (width - len(r)) + r for r in rows])
            lmask = torch.tensor([[j >= width - len(r) for j in range(width)] for r in rows])
            positions = (lmask.long().cumsum(-1) - 1).clamp(min=0)
            theirs = hf(input_ids=left, attention_mask=lmask.long(), position_ids=positions).logits
            cache = ours.new_cache(4)
            torch.testing.assert_close(ours.step(left.masked_fill(~lmask, PAD_TOKEN), cache), theirs[:, -1], atol=1e-4, rtol=0)
            steps = torch.stack([ours.step(torch.tensor([[r[-1]] for r in rows]), cache) for _ in range(3)], 1)
            extended = torch.cat([left, torch.tensor([[r[-1]] * 3 for r in rows])], 1)
            emask = torch.cat([lmask, torch.ones(4, 3, dtype=torch.bool)], 1)
            epos = (emask.long().cumsum(-1) - 1).clamp(min=0)
            full = hf(input_ids=extended, attention_mask=emask.long(), position_ids=epos).logits[:, -3:]
            torch.testing.assert_close(steps, full, atol=1e-4, rtol=0)
            plain = torch.tensor([r[:2] for r in rows])
            torch.testing.assert_close(ours(plain), hf(input_ids=plain).logits, atol=1e-4, rtol=0)


def test_m2m100_sinusoids_are_transformers_table_with_its_offset(hf_models):
    d, hf, _ = hf_models("nllb")
    ours = convert_weights(d)
    theirs = hf.model.encoder.embed_positions.weights  # rows pad_id + 1 + t for the t-th token
    assert ours.cfg.sinusoid_style == "fairseq" and ours.cfg.position_offset == 2
    n = ours.cfg.max_positions
    assert torch.equal(ours.encoder.sinusoids[2 : n + 2], theirs[2 : n + 2])  # the same numbers


# ---------------------------------------------------------------- generate, token for token


@pytest.mark.parametrize("search", ["greedy", "beam"])
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_matches_transformers_token_for_token(hf_models, family, search):
    d, hf, fast = hf_models(family)
    loaded = ids_only(d)
    settings = dict(num_beams=1) if search == "greedy" else dict(num_beams=4, length_penalty=0.8)
    if family.startswith("phi3"):
        rows = random_ids(N_INPUTS, loaded.config.vocab_size, 3, special_ids(hf), seed=11)
        targets = [(None, rows)]
    else:  # [src_lang] X </s>; two target languages from one model, each forced first
        codes = NLLB_CODES if family == "nllb" else M2M100_CODES
        body = random_ids(N_INPUTS, len(fast) - len(codes), 4, special_ids(hf), seed=11)
        rows = [[lang_id(fast, family, codes[i % 2])] + r + [2] for i, r in enumerate(body)]
        targets = [(lang_id(fast, family, codes[2]), rows), (lang_id(fast, family, codes[3]), rows)]
    outputs = []
    for forced, rows in targets:
        extra = {} if forced is None else {"forced_bos_token_id": forced}
        theirs = hf_generate(hf, rows, settings | extra)
        if forced is not None:
            loaded.generation["forced_bos_id"] = forced
            assert all(t[0] == forced for t in theirs)
        mine = ours_generate(loaded, rows, settings)
        assert mine == theirs
        outputs.append(mine)
    assert len({len(t) for out in outputs for t in out}) > 1, "outputs all of one length: a weak test"
    if len(outputs) == 2:
        assert sum(a[1:] != b[1:] for a, b in zip(*outputs)) >= N_INPUTS // 2  # the target language matters


# ---------------------------------------------------------------- the CLI on text


def hf_translate(fast, hf, family, texts, src, tgt, **settings) -> list[str]:
    if family == "nllb":
        fast.src_lang = src
        return hf_text(fast, hf, texts, forced_bos_token_id=lang_id(fast, family, tgt), **settings)
    # M2M100's tokenizer (slow, SentencePiece) puts __src__ X </s>: the same ids, built here
    ids = [[lang_id(fast, family, src)] + fast(t, add_special_tokens=False)["input_ids"] + [2] for t in texts]
    width = max(map(len, ids))
    batch = torch.tensor([r + [1] * (width - len(r)) for r in ids])
    with torch.no_grad():
        out = hf.generate(input_ids=batch, attention_mask=(batch != 1).long(), do_sample=False,
                          forced_bos_token_id=lang_id(fast, family, tgt), **settings)  # fmt: skip
    return fast.batch_decode(out, skip_special_tokens=True)


@pytest.mark.parametrize("family, src, tgts", [("nllb", "deu_Latn", ("fra_Latn", "zho_Hans")), ("m2m100", "de", ("fr", "zh"))])
def test_cli_translate_with_language_codes_matches_transformers(hf_models, family, src, tgts, tmp_path):
    d, hf, fast = hf_models(family)
    texts = sentences(N_INPUTS, 21)
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    for tgt in tgts:
        mine = run("translate", "-m", str(d), str(tmp_path / "in.txt"), "--source-lang", src, "--target-lang", tgt,
                   "--beam", "4", "--length-penalty", "0.8", "--max-len", "8", "--no-repeat-ngram", "0", "-q")  # fmt: skip
        theirs = hf_translate(fast, hf, family, texts, src, tgt, num_beams=4, length_penalty=0.8, max_new_tokens=8)
        assert mine == theirs
        assert len(set(mine)) >= 4
    # without --source-lang: the tokenizer's default (eng_Latn, en)
    mine = run("translate", "-m", str(d), str(tmp_path / "in.txt"), "--target-lang", tgts[0], "--beam", "1",
               "--max-len", "8", "--no-repeat-ngram", "0", "-q")  # fmt: skip
    default = "eng_Latn" if family == "nllb" else "en"
    assert mine == hf_translate(fast, hf, family, texts, default, tgts[0], num_beams=1, max_new_tokens=8)


def test_cli_generate_phi3_matches_transformers(hf_models, tmp_path):
    d, hf, fast = hf_models("phi3")
    texts = sentences(N_INPUTS, 22)
    (tmp_path / "prompts.txt").write_text("\n".join(texts) + "\n")
    mine = run("generate", "-m", str(d), "--input", str(tmp_path / "prompts.txt"), "--greedy", "--max-new-tokens", "8", "-q")
    assert mine == hf_text(fast, hf, texts, max_new_tokens=8)
    assert len(set(mine)) >= 4


def error(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), input="the cat sat\n")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmcli: error: "), result.output
    return lines[0]


def test_unknown_language_codes_and_a_missing_target_are_one_line(hf_models):
    d, _, _ = hf_models("nllb")
    line = error("translate", "-m", str(d), "--target-lang", "German")
    assert "--target-lang 'German' is not one of this model's 4 language codes" in line and "deu_Latn" in line
    line = error("translate", "-m", str(d), "--source-lang", "xx", "--target-lang", "deu_Latn")
    assert "--source-lang 'xx'" in line
    assert "give --target-lang" in error("translate", "-m", str(d))
    assert "--prompt is for instruct" in error("translate", "-m", str(d), "--prompt", "{text}", "--target-lang", "deu_Latn")
    m2m = hf_models("m2m100")[0]
    assert "(e.g. en, de, fr, zh)" in error("translate", "-m", str(m2m), "--target-lang", "eng_Latn")


# ---------------------------------------------------------------- what is refused


def edited(src: Path, dst: Path, **changes) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config | changes))
    return dst


def test_phi3_longrope_and_partial_rotary_are_refused_in_one_line(hf_models, tmp_path):
    d = hf_models("phi3")[0]
    # factor lists of the wrong length (head_dim / 2 is 4): longrope itself runs, test_families_gemma2.py
    longrope = {"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [2.0] * 3}
    for name, changes in (("a", {"rope_scaling": longrope, "rope_parameters": None}),
                          ("b", {"rope_parameters": {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5}})):  # fmt: skip
        with pytest.raises(UserError) as e:
            convert_weights(edited(d, tmp_path / name, **changes))
        assert "\n" not in str(e.value)
        assert ("longrope" if name == "a" else "partial_rotary_factor=0.5") in str(e.value)


def test_phi3_sliding_window_is_carried(hf_models, tmp_path):
    d = edited(hf_models("phi3")[0], tmp_path / "w", sliding_window=2047)
    assert convert_weights(d).cfg.sliding_window == 2047


def test_generation_json_lists_the_languages(hf_models):
    d, _, fast = hf_models("nllb")
    gen = tasks.open_model(str(d), "translate").generation
    assert gen["languages"] == {c: fast.convert_tokens_to_ids(c) for c in NLLB_CODES}
    assert gen["source_lang"] == "eng_Latn" and gen["source_prefix"] == [gen["languages"]["eng_Latn"]]
    assert gen["source_suffix"] == [2]
