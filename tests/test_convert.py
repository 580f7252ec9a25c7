"""Hugging Face checkpoints on llmcli's core: tiny random models of each family built with
`transformers` (fixed seed, save_pretrained, a tokenizer trained here), converted, and held
to the same logits (1e-4, a padded batch) and the same greedy and beam-search tokens as
`model.generate`; then the same through the CLI on text. No downloads."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from llmcli import fast, tasks  # noqa: E402
from llmcli.cache import PAD_TOKEN  # noqa: E402
from llmcli.checkpoint import LoadedModel, load_model  # noqa: E402
from llmcli.cli import app  # noqa: E402
from llmcli.convert import convert, convert_weights  # noqa: E402
from llmcli.convert.common import generation_settings, read_generation_config, read_hf_config  # noqa: E402
from llmcli.errors import UserError  # noqa: E402

WORDS = ("the a cat dog bird sat ran on under over mat house tree river red blue green big small old new "
         "sees likes finds and or but not very quite here there today now").split()  # fmt: skip
N_INPUTS = 24


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 7))) for _ in range(n)]


CORPUS = sentences(300, 0)


# ---------------------------------------------------------------- tokenizers, trained here


def train_bpe(kind: str, specials: list[str], vocab_size: int = 120) -> HFTokenizer:
    """A small BPE tokenizer: byte-level (GPT-2, BART), metaspace (T5, Llama) or wordpiece (BERT)."""
    if kind == "wordpiece":
        tok = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    else:
        unk = "<unk>" if "<unk>" in specials else None
        tok = HFTokenizer(models.BPE(unk_token=unk))
        if kind == "bytelevel":
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
        else:
            tok.pre_tokenizer = pre_tokenizers.Metaspace()
            tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def save_tokenizer(tok: HFTokenizer, directory: Path, **special) -> transformers.PreTrainedTokenizerFast:
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    fast.save_pretrained(directory)
    return fast


# ---------------------------------------------------------------- tiny models of each family


def randomize(model, eos: int, eos_bias: float, skip=("embed_positions",)) -> None:
    """Larger weights than the default init, for peaked, input-dependent outputs; and a push
    on the eos logit so that some outputs end early and others run to the limit."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and not any(s in name for s in skip):
                p.normal_(0, 0.3)
        head = model.get_output_embeddings().weight
        head[eos] *= eos_bias


def build(family: str, directory: Path):
    """Save a tiny random `family` model and its tokenizer to `directory`; return (model, tokenizer)."""
    torch.manual_seed(0)
    if family == "gpt2":
        tok = train_bpe("bytelevel", ["<|endoftext|>"])
        V = tok.get_vocab_size()
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=V, n_positions=64, bos_token_id=0,
                                      eos_token_id=0, tie_word_embeddings=True)  # fmt: skip
        model = transformers.GPT2LMHeadModel(cfg)
        fast = save_tokenizer(tok, directory, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
        randomize(model, 0, 3.0)
    elif family == "llama":
        tok = train_bpe("metaspace", ["<unk>", "<s>", "</s>"])
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        V = tok.get_vocab_size() + 8  # a model vocabulary larger than the tokenizer's
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, vocab_size=V, max_position_embeddings=64, bos_token_id=1,
                                       eos_token_id=2, pad_token_id=None, tie_word_embeddings=False,
                                       rope_parameters={"rope_type": "default", "rope_theta": 500.0})  # fmt: skip
        model = transformers.LlamaForCausalLM(cfg)
        fast = save_tokenizer(tok, directory, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
        randomize(model, 2, 2.0)
    elif family in ("bart", "mbart"):
        tok = train_bpe("bytelevel", ["<s>", "<pad>", "</s>", "<unk>"])
        tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
        V = tok.get_vocab_size()
        kw = dict(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                  decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                  pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2)  # fmt: skip
        if family == "bart":
            model = transformers.BartForConditionalGeneration(transformers.BartConfig(**kw))
            # as facebook/bart-large-cnn ships them
            model.generation_config = transformers.GenerationConfig(
                bos_token_id=0, eos_token_id=2, pad_token_id=1, decoder_start_token_id=2, forced_bos_token_id=0,
                forced_eos_token_id=2, num_beams=4, length_penalty=2.0, no_repeat_ngram_size=3, min_length=3,
                max_length=14, early_stopping=True)  # fmt: skip
        else:
            model = transformers.MBartForConditionalGeneration(transformers.MBartConfig(**kw, scale_embedding=True))
        fast = save_tokenizer(tok, directory, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
        randomize(model, 2, 1.5 if family == "bart" else 3.0)
        with torch.no_grad():
            model.final_logits_bias.normal_(0, 0.5)
    elif family in ("t5", "t5v1.1"):
        tok = train_bpe("metaspace", ["<pad>", "</s>", "<unk>"])
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        V = tok.get_vocab_size() + 4
        v11 = family == "t5v1.1"
        cfg = transformers.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                    relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                                    feed_forward_proj="gated-gelu" if v11 else "relu")  # fmt: skip
        model = transformers.T5ForConditionalGeneration(cfg)
        fast = save_tokenizer(tok, directory, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
        randomize(model, 1, 4.0 if v11 else 3.5)
    elif family == "marian":
        V = marian_sentencepiece(directory) or 100  # without sentencepiece: ids only
        cfg = transformers.MarianConfig(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2,
                                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                        decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=V - 1,
                                        eos_token_id=0, decoder_start_token_id=V - 1, forced_eos_token_id=0,
                                        scale_embedding=True, activation_function="swish")  # fmt: skip
        model = transformers.MarianMTModel(cfg)
        # as Helsinki-NLP/opus-mt-* ship them
        model.generation_config = transformers.GenerationConfig(
            bad_words_ids=[[V - 1]], bos_token_id=0, decoder_start_token_id=V - 1, eos_token_id=0,
            forced_eos_token_id=0, max_length=64, num_beams=4, pad_token_id=V - 1)  # fmt: skip
        fast = None
        randomize(model, 0, 2.0)
        with torch.no_grad():
            model.final_logits_bias.normal_(0, 0.5)
    elif family == "bert":
        tok = train_bpe("wordpiece", ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
        cfg = transformers.BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)  # fmt: skip
        model = transformers.BertForQuestionAnswering(cfg)
        fast = save_tokenizer(tok, directory, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                              cls_token="[CLS]", mask_token="[MASK]")  # fmt: skip
        torch.manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.2)
    else:
        raise ValueError(family)
    model.save_pretrained(directory)
    return model.eval(), fast


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """family -> (directory, HF model reloaded from it, HF tokenizer or None), built once per module."""
    cache = {}

    def get(family):
        if family not in cache:
            d = tmp_path_factory.mktemp(family.replace(".", ""))
            _, fast = build(family, d)
            model = getattr(transformers, json.loads((d / "config.json").read_text())["architectures"][0])
            cache[family] = (d, model.from_pretrained(d).eval(), fast)
        return cache[family]

    return get


def ids_only(d: Path) -> LoadedModel:
    """Our model and generation settings from `d`, without a tokenizer (id-level tests)."""
    model = convert_weights(d)
    hf = read_hf_config(d)
    return LoadedModel(model, None, None, generation_settings(read_generation_config(d, hf), model.cfg), d)


def random_ids(n: int, V: int, low: int, exclude: set[int], seed: int, lengths=(2, 9)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        row = []
        while len(row) < int(torch.randint(lengths[0], lengths[1], (1,), generator=g)):
            t = int(torch.randint(low, V, (1,), generator=g))
            if t not in exclude:
                row.append(t)
        out.append(row)
    return out


SEQ2SEQ = ["bart", "mbart", "marian", "t5", "t5v1.1"]
DECODER_ONLY = ["gpt2", "llama"]


def special_ids(model) -> set[int]:
    c = model.config
    ids = [getattr(c, k, None) for k in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")]
    return {i for i in ids if i is not None}


# ---------------------------------------------------------------- logits


@pytest.mark.parametrize("kernels", ["plain", "fast"])
@pytest.mark.parametrize("family", SEQ2SEQ + DECODER_ONLY)
def test_logits_match_transformers_on_a_padded_batch(hf_models, family, kernels, monkeypatch):
    d, hf, _ = hf_models(family)
    ours = convert_weights(d)
    if kernels == "fast":  # llmcli.fast as the commands apply it, every linear layer packed however small
        monkeypatch.setattr(fast, "ONEDNN_MIN_WEIGHT", 1)
        fast.prepare(ours)
    V = ours.cfg.output_vocab_size
    rows = random_ids(4, V, 3, special_ids(hf), seed=5, lengths=(2, 10))
    width = max(map(len, rows))
    mask = torch.tensor([[j < len(r) for j in range(width)] for r in rows])
    with torch.inference_mode():
        if ours.cfg.is_encoder_decoder:
            pad = hf.config.pad_token_id
            src = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
            tgt = torch.tensor(random_ids(4, V, 3, special_ids(hf), seed=6, lengths=(6, 7)))
            theirs = hf(input_ids=src, attention_mask=mask.long(), decoder_input_ids=tgt).logits
            mine = ours(tgt, src, mask)
            torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)
            # and step by step through the cache, as decoding runs it
            cache = ours.new_cache(4, ours.encode(src, mask), mask)
            steps = torch.stack([ours.step(tgt[:, t : t + 1], cache) for t in range(tgt.shape[1])], 1)
            torch.testing.assert_close(steps, theirs, atol=1e-4, rtol=0)
        else:  # left padding, as generation pads prompts
            left = torch.tensor([[0] * (width - len(r)) + r for r in rows])
            lmask = torch.tensor([[j >= width - len(r) for j in range(width)] for r in rows])
            positions = (lmask.long().cumsum(-1) - 1).clamp(min=0)
            theirs = hf(input_ids=left, attention_mask=lmask.long(), position_ids=positions).logits
            cache = ours.new_cache(4)
            mine = ours.step(left.masked_fill(~lmask, PAD_TOKEN), cache)
            torch.testing.assert_close(mine, theirs[:, -1], atol=1e-4, rtol=0)
            full = ours(torch.tensor([r[:2] for r in rows]))  # unpadded rows: every position
            torch.testing.assert_close(full, hf(input_ids=torch.tensor([r[:2] for r in rows])).logits, atol=1e-4, rtol=0)


def test_t5_v1_1_with_its_own_output_matrix_as_on_the_hub(hf_models, tmp_path):
    """Hub T5 v1.1 files say tie_word_embeddings=false and hold lm_head.weight: untied, unscaled."""
    from safetensors.torch import load_file, save_file

    d = copy_dir(hf_models("t5v1.1")[0], tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    config.pop("scale_decoder_outputs", None)
    (d / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": False}))
    tensors = load_file(d / "model.safetensors")
    tensors["lm_head.weight"] = torch.randn_like(tensors["shared.weight"]) * 0.3
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    hf = transformers.T5ForConditionalGeneration.from_pretrained(d).eval()
    ours = convert_weights(d)
    assert not ours.cfg.tied_output and ours.cfg.logits_scale == 1.0
    src, tgt = torch.tensor([[5, 6, 7, 1], [8, 9, 1, 0]]), torch.tensor([[0, 5, 6], [0, 7, 8]])
    with torch.no_grad():
        theirs = hf(input_ids=src, attention_mask=(src != 0).long(), decoder_input_ids=tgt).logits
        torch.testing.assert_close(ours(tgt, src, src != 0), theirs, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- generate, token for token

# beam 4 with a length penalty below 1 for some families, above for others
BEAM_LENGTH_PENALTY = {"bart": 1.2, "mbart": 0.6, "marian": 1.2, "t5": 0.6, "t5v1.1": 1.2, "gpt2": 0.6, "llama": 1.2}
MAX_NEW = 10


def ours_generate(loaded: LoadedModel, rows: list[list[int]], search: dict) -> list[list[int]]:
    model, cfg = loaded.model, loaded.config
    settings = tasks.DecodeSettings(beam_size=search["num_beams"], length_penalty=search.get("length_penalty", 1.0))
    settings = tasks.with_defaults(settings, loaded)  # BART's min length, n-gram ban, early stopping
    with torch.inference_mode():
        if cfg.is_encoder_decoder:
            width = max(map(len, rows))
            src = torch.tensor([r + [cfg.pad_id] * (width - len(r)) for r in rows])
            mask = src != cfg.pad_id
            cache = model.new_cache(len(rows), model.encode(src, mask), mask)
            start = torch.full((len(rows), 1), cfg.start_id)
        else:
            width = max(map(len, rows))
            start = torch.tensor([[PAD_TOKEN] * (width - len(r)) + r for r in rows])
            cache = model.new_cache(len(rows))
        hyps = tasks._decode_batch(loaded, model.step, cache, start, MAX_NEW, settings, tasks._suppressed(loaded))
    return [h[0].tokens for h in hyps]


def hf_generate(hf, rows: list[list[int]], search: dict) -> list[list[int]]:
    c = hf.config
    width = max(map(len, rows))
    eos = c.eos_token_id
    with torch.inference_mode():
        if c.is_encoder_decoder:
            src = torch.tensor([r + [c.pad_token_id] * (width - len(r)) for r in rows])
            out = hf.generate(input_ids=src, attention_mask=(src != c.pad_token_id).long(), max_new_tokens=MAX_NEW,
                              do_sample=False, **search)[:, 1:]  # fmt: skip
        else:
            pad = eos
            src = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
            mask = torch.tensor([[j >= width - len(r) for j in range(width)] for r in rows]).long()
            out = hf.generate(input_ids=src, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False,
                              pad_token_id=pad, **search)[:, width:]  # fmt: skip
    result = []
    for row in out.tolist():
        result.append(row[: row.index(eos)] if eos in row else row)
    return result


@pytest.mark.parametrize("search", ["greedy", "beam"])
@pytest.mark.parametrize("family", SEQ2SEQ + DECODER_ONLY)
def test_generate_matches_transformers_token_for_token(hf_models, family, search):
    d, hf, _ = hf_models(family)
    loaded = ids_only(d)
    rows = random_ids(N_INPUTS, loaded.config.vocab_size, 3, special_ids(hf), seed=11)
    settings = dict(num_beams=1) if search == "greedy" else dict(num_beams=4, length_penalty=BEAM_LENGTH_PENALTY[family])
    # (model settings like BART's min_length and no_repeat_ngram_size apply on both sides)
    theirs = hf_generate(hf, rows, settings)
    mine = ours_generate(loaded, rows, settings)
    assert mine == theirs
    lengths = {len(t) for t in theirs}
    assert len(lengths) > 1, f"outputs all of length {lengths}: a weak test"


# ---------------------------------------------------------------- the CLI on text


def run(*args: str, input: str | None = None) -> list[str]:
    result = CliRunner().invoke(app, list(args), input=input)
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()


def hf_text(fast, hf, texts: list[str], **settings) -> list[str]:
    c = hf.config
    if c.is_encoder_decoder:
        batch = fast(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = hf.generate(**batch, do_sample=False, **settings)
    else:
        fast.pad_token = fast.pad_token or fast.eos_token
        fast.padding_side = "left"
        batch = fast(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = hf.generate(**batch, do_sample=False, pad_token_id=fast.pad_token_id, **settings)
        out = out[:, batch["input_ids"].shape[1] :]
    return [t.replace("\n", "\\n") for t in fast.batch_decode(out, skip_special_tokens=True)]


@pytest.mark.parametrize("family, command", [("bart", "summarize"), ("mbart", "translate"), ("t5", "translate"),
                                             ("t5v1.1", "summarize")])  # fmt: skip
def test_cli_on_text_matches_transformers(hf_models, family, command, tmp_path):
    d, hf, fast = hf_models(family)
    texts = sentences(N_INPUTS, 21)
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    if family == "bart":  # no options: the model's own beam 4, length penalty 2, min and max length, n-gram ban
        mine = run(command, "-m", str(d), str(tmp_path / "in.txt"), "-q")
        theirs = hf_text(fast, hf, texts)
    else:
        mine = run(command, "-m", str(d), str(tmp_path / "in.txt"), "--beam", "4", "--length-penalty", "0.6",
                   "--max-len", "8", "--no-repeat-ngram", "0", "-q")  # fmt: skip
        theirs = hf_text(fast, hf, texts, num_beams=4, length_penalty=0.6, max_new_tokens=8)
    assert mine == theirs
    assert len(set(mine)) >= 4


def test_a_tokenizer_that_adds_no_special_tokens_feeds_the_encoder_as_transformers_does(hf_models, tmp_path):
    """llmcli appended </s> to every source whatever the tokenizer did; transformers feeds the
    tokenizer's ids as they are."""
    d, hf, _ = hf_models("bart")
    d = copy_dir(d, tmp_path / "bare")
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["post_processor"] = None
    (d / "tokenizer.json").write_text(json.dumps(tok))
    fast = transformers.AutoTokenizer.from_pretrained(d)
    texts = sentences(N_INPUTS, 23)
    assert fast(texts[0])["input_ids"] == fast(texts[0], add_special_tokens=False)["input_ids"]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    mine = run("summarize", "-m", str(d), str(tmp_path / "in.txt"), "-q")
    assert mine == hf_text(fast, hf, texts)
    assert tasks.open_model(str(d), "summarize").generation["source_suffix"] == []


@pytest.mark.parametrize("family", DECODER_ONLY)
def test_cli_generate_matches_transformers(hf_models, family, tmp_path):
    d, hf, fast = hf_models(family)
    texts = sentences(N_INPUTS, 22)
    (tmp_path / "prompts.txt").write_text("\n".join(texts) + "\n")
    mine = run("generate", "-m", str(d), "--input", str(tmp_path / "prompts.txt"), "--greedy", "--max-new-tokens", "8", "-q")
    theirs = hf_text(fast, hf, texts, max_new_tokens=8)
    assert mine == theirs
    assert len(set(mine)) >= 4


# ---------------------------------------------------------------- Marian: SentencePiece


def marian_sentencepiece(directory: Path) -> int | None:
    """Marian's tokenizer files: source.spm and target.spm (SentencePiece Unigram models trained
    here on two different corpora) and one vocab.json over both; returns the vocabulary size."""
    try:
        import sentencepiece as spm
    except ImportError:
        return None
    import io

    vocab = {"</s>": 0, "<unk>": 1}
    for side, corpus in (("source", CORPUS), ("target", [s.upper() for s in CORPUS])):
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf, vocab_size=45,
                                       model_type="unigram", character_coverage=1.0, minloglevel=2,
                                       bos_id=-1, eos_id=1, unk_id=2, pad_id=-1, num_threads=1)  # fmt: skip
        (directory / f"{side}.spm").write_bytes(buf.getvalue())
        sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
        for i in range(sp.get_piece_size()):
            if not (sp.is_control(i) or sp.is_unknown(i)) and sp.id_to_piece(i) not in vocab:
                vocab[sp.id_to_piece(i)] = len(vocab)
    vocab["<pad>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "MarianTokenizer",
                                                                 "model_max_length": 64}))  # fmt: skip
    return len(vocab)


@pytest.fixture(scope="module")
def marian_dir(hf_models):
    pytest.importorskip("sentencepiece")
    d, hf, _ = hf_models("marian")
    return d, hf, transformers.MarianTokenizer.from_pretrained(d)


def test_marian_sentencepiece_tokenizer_matches_transformers(marian_dir):
    d, hf, marian_tok = marian_dir
    loaded = convert(d)
    texts = sentences(N_INPUTS, 23) + ["  extra   spaces  here ", "unseen wörds ☃ here", "the cat"]
    mine = loaded.source_tokenizer.encode_batch(texts, add_eos=True)
    assert mine == marian_tok(texts)["input_ids"]
    assert loaded.source_tokenizer is not loaded.tokenizer
    # target side: decoding target pieces, as MarianTokenizer does
    target_ids = [marian_tok(text_target=s.upper())["input_ids"] for s in texts[:N_INPUTS]]
    assert loaded.tokenizer.decode_batch(target_ids) == marian_tok.batch_decode(target_ids, skip_special_tokens=True)


def test_marian_cli_translate_matches_transformers(marian_dir, tmp_path):
    d, hf, marian_tok = marian_dir
    texts = sentences(N_INPUTS, 24)
    (tmp_path / "in.en").write_text("\n".join(texts) + "\n")
    # no options: the model's beam 4 and max length, its banned pad and forced eos, as generate uses them
    mine = run("translate", "-m", str(d), str(tmp_path / "in.en"), "-q")
    batch = marian_tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = hf.generate(**batch)
    assert mine == marian_tok.batch_decode(out, skip_special_tokens=True)
    greedy = run("translate", "-m", str(d), str(tmp_path / "in.en"), "--beam", "1", "--max-len", "12", "-q")
    with torch.no_grad():
        out = hf.generate(**batch, num_beams=1, max_new_tokens=12)
    assert greedy == marian_tok.batch_decode(out, skip_special_tokens=True)


# ---------------------------------------------------------------- BERT: extractive QA


QA = [("what sat on the mat", "the cat sat on the mat today and the dog ran under the tree"),
      ("who likes the river", "a big old dog likes the blue river but the bird sees the house"),
      ("where is the bird", "the small bird is there on the green tree and not in the house")] * 8  # fmt: skip


def test_bert_span_logits_and_answers_match_transformers(hf_models, tmp_path):
    d, hf, fast = hf_models("bert")
    loaded = convert(d)
    assert loaded.config.architecture == "encoder-only"
    batch = fast([q for q, _ in QA[:3]], [c for _, c in QA[:3]], return_tensors="pt", padding=True, return_token_type_ids=True)
    with torch.inference_mode():
        theirs = hf(**batch)
        mine = loaded.model.span_logits(batch["input_ids"], batch["attention_mask"].bool(), batch["token_type_ids"])
    torch.testing.assert_close(mine[..., 0], theirs.start_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(mine[..., 1], theirs.end_logits, atol=1e-4, rtol=0)

    # The question-answering pipeline's choice (removed in transformers 5), spelled out on their logits:
    # softmax over context tokens for start and for end, the best start * end with 0 <= end - start < 15.
    expected = []
    for j, (q, c) in enumerate(QA[:3]):
        enc = fast(q, c, return_offsets_mapping=True)
        context = [k for k, sid in enumerate(enc.sequence_ids()) if sid == 1]
        start, end = (torch.full((len(enc["input_ids"]),), -10000.0) for _ in range(2))
        start[context] = theirs.start_logits[j, context]
        end[context] = theirs.end_logits[j, context]
        p_start, p_end = start.softmax(0), end.softmax(0)
        score, a, b = max((float(p_start[a] * p_end[b]), a, b) for a in context for b in context if 0 <= b - a < 15)
        offsets = enc["offset_mapping"]
        expected.append({"answer": c[offsets[a][0] : offsets[b][1]], "score": score, "start": offsets[a][0],
                         "end": offsets[b][1]})  # fmt: skip
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({"question": q, "context": c}) + "\n" for q, c in QA))
    lines = run("qa", "-m", str(d), str(tmp_path / "qa.jsonl"), "--format", "jsonl", "--max-len", "15", "-q")
    got = [json.loads(line)["hypotheses"][0] for line in lines]
    assert len(got) == len(QA)
    for g, e in zip(got, expected * 8):
        assert g["text"] == e["answer"]
        assert g["score"] == pytest.approx(e["score"], abs=1e-4)
    answers = list(tasks.extractive_qa(loaded, [type("R", (), {"question": q, "context": c}) for q, c in QA[:3]], 15))
    assert [(a.start, a.end) for a in answers] == [(e["start"], e["end"]) for e in expected]


# ---------------------------------------------------------------- convert, model ids, caches


def test_convert_command_writes_an_llmcli_model_directory(hf_models, tmp_path):
    d, hf, fast = hf_models("gpt2")
    out = tmp_path / "converted"
    result = CliRunner().invoke(app, ["convert", str(d), str(out)])
    assert result.exit_code == 0, result.output
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation.json"} <= {p.name for p in out.iterdir()}
    assert "converted gpt2" in result.stderr
    loaded = load_model(out)
    assert loaded.generation["prompt_prefix"] == [] and loaded.tokenizer.eos_id == 0
    expected = hf_text(fast, hf, ["the cat sat"], max_new_tokens=6)
    assert run("generate", "-m", str(out), "the cat sat", "--greedy", "--max-new-tokens", "6") == expected


def hub_layout(root: Path, model_id: str, src: Path) -> Path:
    """The standard Hugging Face cache layout: models--org--name/{refs/main, snapshots/<commit>/}."""
    repo = root / "hub" / ("models--" + model_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in src.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_a_model_id_resolves_from_the_hugging_face_cache_offline(hf_models, tmp_path, monkeypatch):
    d, hf, fast = hf_models("llama")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_layout(tmp_path / "hf", "tiny-org/tiny-llama", d)
    texts = sentences(3, 30)
    expected = hf_text(fast, hf, texts, max_new_tokens=6)
    assert run("generate", "-m", "tiny-org/tiny-llama", "--input", "-", "--greedy", "--max-new-tokens", "6", "-q",
               input="\n".join(texts) + "\n") == expected  # fmt: skip
    converted = list((Path(__import__("os").environ["LLMCLI_CACHE"]) / "converted").iterdir())
    assert len(converted) == 1 and converted[0].name.startswith("tiny-org--tiny-llama-")
    # the second run loads the cached conversion
    assert run("generate", "-m", "tiny-org/tiny-llama", texts[0], "--greedy", "--max-new-tokens", "6") == expected[:1]
    # without huggingface_hub, the layout is read by hand
    from llmcli import hub

    assert hub._find_by_layout(tmp_path / "hf" / "hub", "tiny-org/tiny-llama", "main") is not None


def test_a_model_id_not_in_the_cache_offline_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(app, ["translate", "-m", "some-org/missing-model"], input="hello\n")
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert "\n" not in line and "some-org/missing-model" in line
    assert "not in the Hugging Face cache" in line and "HF_HUB_OFFLINE" in line


# ---------------------------------------------------------------- refusals: one line naming them


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def error_of(path) -> str:
    with pytest.raises(UserError) as e:
        convert(path)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_unknown_architecture_is_refused(hf_models, tmp_path):
    d = copy_dir(hf_models("gpt2")[0], tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(config | {"model_type": "mamba"}))
    assert "unknown architecture 'mamba'" in error_of(d)


def test_missing_unexpected_and_misshapen_tensors_are_named(hf_models, tmp_path):
    from safetensors.torch import load_file, save_file

    d = copy_dir(hf_models("bart")[0], tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    del tensors["model.decoder.layers.1.fc1.weight"]
    tensors["model.decoder.layers.0.extra.weight"] = torch.zeros(2)
    tensors["model.encoder.layers.0.fc2.bias"] = torch.zeros(5)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    message = error_of(d)
    assert "missing model.decoder.layers.1.fc1.weight" in message
    assert "unexpected model.decoder.layers.0.extra.weight" in message
    assert "shape mismatch model.encoder.layers.0.fc2.bias (5,) != (32,)" in message


def test_pytorch_model_bin_loads_weights_only(hf_models, tmp_path):
    d, hf, _ = hf_models("t5")
    # transformers 5 writes safetensors only: the same tensors through torch.save, as older versions wrote them
    from safetensors.torch import load_file

    bin_dir = copy_dir(d, tmp_path / "bin")
    torch.save(load_file(bin_dir / "model.safetensors"), bin_dir / "pytorch_model.bin")
    (bin_dir / "model.safetensors").unlink()
    a, b = convert_weights(d), convert_weights(bin_dir)
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {_Exploit.marker}",))


def test_a_pickle_that_would_run_code_is_refused_and_never_runs(hf_models, tmp_path):
    import pickle

    d = copy_dir(hf_models("gpt2")[0], tmp_path / "m")
    (d / "model.safetensors").unlink()
    _Exploit.marker = tmp_path / "control"
    payload = pickle.dumps({"transformer.wte.weight": _Exploit()}, protocol=2)
    pickle.loads(payload)  # the control: a plain unpickler runs it
    assert _Exploit.marker.exists()
    _Exploit.marker = tmp_path / "pwned"
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"transformer.wte.weight": _Exploit()}, protocol=2))
    assert "refused" in error_of(d)
    assert not _Exploit.marker.exists()
    # the zip format torch.save writes, too
    import io
    import zipfile

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(1)}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        names = z.namelist()
        pkl = next(n for n in names if n.endswith("data.pkl"))
        parts = {n: z.read(n) for n in names}
    parts[pkl] = pickle.dumps({"transformer.wte.weight": _Exploit()}, protocol=2)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for n, data in parts.items():
            z.writestr(n, data)
    (d / "pytorch_model.bin").write_bytes(out.getvalue())
    assert "refused" in error_of(d)
    assert not _Exploit.marker.exists()


def test_only_safetensors_or_pickles_are_read(hf_models, tmp_path):
    d = copy_dir(hf_models("gpt2")[0], tmp_path / "m")
    (d / "model.safetensors").rename(d / "tf_model.h5")
    assert "no model.safetensors or pytorch_model.bin (it has tf_model.h5)" in error_of(d)
