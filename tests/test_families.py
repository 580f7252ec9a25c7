"""Qwen2/2.5, Qwen3, Mistral and Gemma on llmcli's core: tiny random `transformers` models
(fixed seed, save_pretrained, tokenizers trained here), converted and held to transformers'
logits (1e-4, a left-padded batch, full and step by step through the cache) and to
`model.generate`'s greedy and beam-4 tokens; then the CLI on text. Mistral's sliding window
(4) is shorter than every sequence decoded. No downloads."""

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
from tokenizers import processors  # noqa: E402

from llmcli import fast  # noqa: E402
from llmcli.cache import PAD_TOKEN  # noqa: E402
from llmcli.convert import convert_weights  # noqa: E402
from llmcli.errors import UserError  # noqa: E402

FAMILIES = ["qwen2", "qwen3", "mistral", "gemma"]
WINDOW = 4  # Mistral's sliding window here: prompts run to 9 tokens, outputs to 10 more
SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64)  # fmt: skip


def build(family: str, directory):
    """Save a tiny random `family` model and its tokenizer to `directory`; return the HF tokenizer."""
    torch.manual_seed(0)
    if family in ("qwen2", "qwen3"):  # byte-level BPE, <|endoftext|> ends texts; small Qwens tie embeddings
        tok = train_bpe("bytelevel", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        V = tok.get_vocab_size()
        kw = dict(SIZES, vocab_size=V, bos_token_id=None, eos_token_id=0, pad_token_id=None, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000.0})  # fmt: skip
        if family == "qwen2":
            model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
        else:  # a head size of its own, as every Qwen3 has (128 for d_model 1024 and 16 heads)
            model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**kw, head_dim=16))
        hf_tok = save_tokenizer(tok, directory, eos_token="<|endoftext|>")
        eos, eos_bias = 0, 2.0
    elif family == "mistral":
        tok = train_bpe("metaspace", ["<unk>", "<s>", "</s>"])
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        cfg = transformers.MistralConfig(**SIZES, vocab_size=tok.get_vocab_size(), bos_token_id=1, eos_token_id=2,
                                         sliding_window=WINDOW, tie_word_embeddings=False)  # fmt: skip
        model = transformers.MistralForCausalLM(cfg)
        hf_tok = save_tokenizer(tok, directory, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
        eos, eos_bias = 2, 2.0
    elif family == "gemma":
        tok = train_bpe("metaspace", ["<pad>", "<eos>", "<bos>", "<unk>"])
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
        cfg = transformers.GemmaConfig(**SIZES, head_dim=16, vocab_size=tok.get_vocab_size(), pad_token_id=0,
                                       eos_token_id=1, bos_token_id=2, hidden_act="gelu_pytorch_tanh")  # fmt: skip
        model = transformers.GemmaForCausalLM(cfg)
        hf_tok = save_tokenizer(tok, directory, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
        eos, eos_bias = 1, 2.0
    else:
        raise ValueError(family)
    randomize(model, eos, eos_bias)
    with torch.no_grad():  # biases and norm weights off their init, so each one is tested
        for name, p in model.named_parameters():
            if p.dim() == 1 and (name.endswith("bias") or family == "gemma"):  # Gemma's norms scale by 1 + weight
                p.normal_(0, 0.3)
            elif p.dim() == 1:
                p.uniform_(0.5, 1.5)
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
    cfgs = {f: convert_weights(hf_models(f)[0]).cfg for f in FAMILIES}
    assert cfgs["qwen2"].qkv_bias and not cfgs["qwen2"].bias and cfgs["qwen2"].tied_output
    assert cfgs["qwen3"].qk_norm and cfgs["qwen3"].head_dim == 16 and cfgs["qwen3"].d_head == 16
    assert cfgs["mistral"].sliding_window == WINDOW and not cfgs["mistral"].tied_output
    g = cfgs["gemma"]
    assert (g.norm_weight_offset, g.scale_embeddings, g.activation, g.glu, g.head_dim) == (1.0, True, "gelu_tanh", True, 16)
    assert all(c.sliding_window is None for f, c in cfgs.items() if f != "mistral")


# ---------------------------------------------------------------- logits


@pytest.mark.parametrize("kernels", ["plain", "fast"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_full_and_step_by_step(hf_models, family, kernels, monkeypatch):
    d, hf, _ = hf_models(family)
    ours = convert_weights(d)
    if kernels == "fast":  # every linear layer packed however small, one-query attention in the steps
        monkeypatch.setattr(fast, "ONEDNN_MIN_WEIGHT", 1)
        fast.prepare(ours)
    rows = random_ids(4, ours.cfg.vocab_size, 3, special_ids(hf), seed=5, lengths=(7, 15))
    width, shortest = max(map(len, rows)), min(map(len, rows))
    assert shortest > WINDOW + 1
    left = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    lmask = torch.tensor([[j >= width - len(r) for j in range(width)] for r in rows])
    positions = (lmask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        theirs = hf(input_ids=left, attention_mask=lmask.long(), position_ids=positions).logits
        # the padding and the first token of the shortest row in one call, then a token at a time
        first = width - shortest + 1
        cache = ours.new_cache(4)
        steps = [ours.step(left[:, :first].masked_fill(~lmask[:, :first], PAD_TOKEN), cache)]
        steps += [ours.step(left[:, t : t + 1], cache) for t in range(first, width)]
        torch.testing.assert_close(torch.stack(steps, 1), theirs[:, first - 1 :], atol=1e-4, rtol=0)
        # a full pass on unpadded rows, longer than Mistral's window
        full = torch.tensor([r[:shortest] for r in rows])
        torch.testing.assert_close(ours(full), hf(input_ids=full).logits, atol=1e-4, rtol=0)


def test_the_sliding_window_changes_mistral_s_logits(hf_models):
    """Without the window the same weights give other logits: the tests above would see a lost mask."""
    d, hf, _ = hf_models("mistral")
    ours = convert_weights(d)
    unwindowed = type(ours)(ours.cfg.replace(sliding_window=None)).eval()
    unwindowed.load_state_dict(ours.state_dict())
    tokens = torch.tensor([random_ids(1, ours.cfg.vocab_size, 3, special_ids(hf), seed=7, lengths=(12, 13))[0]])
    with torch.inference_mode():
        a, b = ours(tokens), unwindowed(tokens)
    torch.testing.assert_close(a[:, :WINDOW], b[:, :WINDOW], atol=1e-5, rtol=0)
    assert (a[:, WINDOW:] - b[:, WINDOW:]).abs().max() > 1e-2


# ---------------------------------------------------------------- generate, token for token

BEAM_LENGTH_PENALTY = {"qwen2": 0.6, "qwen3": 1.2, "mistral": 1.2, "gemma": 0.6}


@pytest.mark.parametrize("search", ["greedy", "beam"])
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_matches_transformers_token_for_token(hf_models, family, search):
    d, hf, _ = hf_models(family)
    loaded = ids_only(d)
    rows = random_ids(N_INPUTS, loaded.config.vocab_size, 3, special_ids(hf), seed=11)
    settings = dict(num_beams=1) if search == "greedy" else dict(num_beams=4, length_penalty=BEAM_LENGTH_PENALTY[family])
    theirs = hf_generate(hf, rows, settings)
    mine = ours_generate(loaded, rows, settings)
    assert mine == theirs
    lengths = {len(t) for t in theirs}
    assert len(lengths) > 1, f"outputs all of length {lengths}: a weak test"


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_generate_matches_transformers(hf_models, family, tmp_path):
    d, hf, hf_tok = hf_models(family)
    texts = sentences(N_INPUTS, 22)
    (tmp_path / "prompts.txt").write_text("\n".join(texts) + "\n")
    mine = run("generate", "-m", str(d), "--input", str(tmp_path / "prompts.txt"), "--greedy", "--max-new-tokens", "8", "-q")
    theirs = hf_text(hf_tok, hf, texts, max_new_tokens=8)
    assert mine == theirs
    assert len(set(mine)) >= 4


# ---------------------------------------------------------------- transformers 4.x files, and refusals


def rewrite_config(src, dst, change) -> None:
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    change(config)
    (dst / "config.json").write_text(json.dumps(config))


def as_4x(family: str):
    """config.json as transformers 4.x wrote it: rope_theta at the top, no layer_types; Qwen's
    window written but switched off; Gemma's activation in hidden_activation."""

    def change(config):
        config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
        config.pop("layer_types", None)
        if family in ("qwen2", "qwen3"):
            config.update(use_sliding_window=False, sliding_window=4096, max_window_layers=2)
        if family == "gemma":
            config.update(hidden_act="gelu", hidden_activation="gelu_pytorch_tanh")

    return change


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_4_config_files_convert_to_the_same_model(hf_models, family, tmp_path):
    d = hf_models(family)[0]
    rewrite_config(d, tmp_path / "old", as_4x(family))
    assert convert_weights(tmp_path / "old").cfg == convert_weights(d).cfg


@pytest.mark.parametrize(
    "family, change, message",
    [
        ("qwen2", lambda c: c.update(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "factor": 4.0}), "'longrope'"),
        ("mistral", lambda c: c.update(rope_scaling={"type": "su", "factor": 2.0}, rope_parameters=None), "'su'"),
        (
            "qwen2",
            lambda c: c.update(layer_types=["full_attention", "sliding_attention"], sliding_window=4, use_sliding_window=True),
            "some layers",
        ),
        ("qwen3", lambda c: c.update(attention_bias=True), "attention_bias"),
        ("mistral", lambda c: c.update(layer_types=["full_attention", "sliding_attention"]), "mixed"),
        ("gemma", lambda c: c.update(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
        # Gemma 2 and 3 run (test_families_gemma2.py); Gemma 3n does not
        ("gemma", lambda c: c.update(model_type="gemma3n", architectures=["Gemma3nForConditionalGeneration"]), "'gemma3n'"),
    ],
)
def test_an_unsupported_feature_is_one_line_naming_it(hf_models, tmp_path, family, change, message):
    rewrite_config(hf_models(family)[0], tmp_path / "m", change)
    with pytest.raises(UserError) as e:
        convert_weights(tmp_path / "m")
    assert message in str(e.value) and "\n" not in str(e.value)
