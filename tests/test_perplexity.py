"""`llmcli eval --metric perplexity`: the text as one stream in windows of the model's context,
held to a `transformers` reference (HF's perplexity guide loop; lm-eval-harness's rolling
windows) on tiny random GPT-2 and Llama models with a 32-token context; bits per byte by its
definition; --per-line as before; bad input; `llmcli --version`. No downloads."""

from __future__ import annotations

import json
import math
import random
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from llmcli import tasks  # noqa: E402
from llmcli.cli import app  # noqa: E402
from llmcli.errors import UserError  # noqa: E402

CONTEXT = 32  # small, so that the text spans many windows
WORDS = "the a cat dog bird sat ran on under over mat house tree river red blue green big small old new".split()


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) for _ in range(n)]


LINES = sentences(30, 1) + [""] + sentences(5, 2)  # an empty line inside: a paragraph break


def train_bpe(kind: str, specials: list[str]) -> HFTokenizer:
    tok = HFTokenizer(models.BPE(unk_token="<unk>" if "<unk>" in specials else None))
    if kind == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=specials, show_progress=False)
    corpus = sentences(300, 0)
    tok.train_from_iterator(corpus + ["\n".join(corpus[i : i + 5]) for i in range(0, 300, 5)], trainer)  # sees "\n"
    return tok


def build(family: str, directory: Path):
    """A tiny random `family` model with a 32-token context and its tokenizer, saved to `directory`."""
    torch.manual_seed(0)
    if family == "gpt2":
        tok = train_bpe("bytelevel", ["<|endoftext|>"])
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=tok.get_vocab_size(), n_positions=CONTEXT,
                                      bos_token_id=0, eos_token_id=0)  # fmt: skip
        model = transformers.GPT2LMHeadModel(cfg)
        special = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    else:
        tok = train_bpe("metaspace", ["<unk>", "<s>", "</s>"])
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, vocab_size=tok.get_vocab_size(),
                                       max_position_embeddings=CONTEXT, bos_token_id=1, eos_token_id=2,
                                       tie_word_embeddings=False)  # fmt: skip
        model = transformers.LlamaForCausalLM(cfg)
        special = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    with torch.no_grad():  # larger than the default init: peaked, context-dependent predictions
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    fast.save_pretrained(directory)
    model.save_pretrained(directory)
    return model.eval(), fast


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def lm(request, tmp_path_factory):
    """(HF directory, HF model, HF tokenizer) of each family."""
    d = tmp_path_factory.mktemp(request.param)
    model, fast = build(request.param, d)
    return d, model, fast


# ---------------------------------------------------------------- references with transformers


def hf_guide(model, ids: list[int], stride: int) -> tuple[float, int]:
    """https://huggingface.co/docs/transformers/perplexity's loop: (mean nll, tokens). As printed
    it counts a window's scored tokens as its targets less one, the first target lost to the
    label shift; only a window that is all targets loses one (the first, and all when stride ==
    context). Elsewhere it under-counts and misweights (stride 1: later windows count 0 tokens;
    transformers#30975, #29028), so here it counts the tokens its loss averages."""
    encodings = torch.tensor([ids])
    max_length, seq_len = model.config.max_position_embeddings, encodings.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            neg_log_likelihood = model(input_ids, labels=target_ids).loss
        num_loss_tokens = (target_ids[:, 1:] != -100).sum().item()  # what the shifted loss averages over
        if stride == max_length:  # the guide as printed, exact here
            assert num_loss_tokens == (target_ids != -100).sum().item() - target_ids.size(0)
        nll_sum += neg_log_likelihood.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum / n_tokens, n_tokens


def rolling(model, ids: list[int]) -> tuple[float, int]:
    """lm-eval-harness's rolling windows: inputs of the whole context, each token predicted once."""
    context = model.config.max_position_embeddings
    total, count = 0.0, 0
    for begin in range(0, len(ids) - 1, context):
        window = torch.tensor([ids[begin : begin + context + 1]])
        with torch.no_grad():
            logits = model(window[:, :-1]).logits[0]
        total += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
        count += window.size(1) - 1
    return total / count, count


def per_line(model, fast, lines: list[str]) -> tuple[float, int]:
    total, count = 0.0, 0
    for line in lines:
        ids = [model.config.bos_token_id] + fast(line, add_special_tokens=False)["input_ids"] + [model.config.eos_token_id]
        mean, n = rolling(model, ids)
        total, count = total + mean * n, count + n
    return total / count, count


# ---------------------------------------------------------------- parity


def test_the_text_is_longer_than_many_windows(lm):
    _, _, fast = lm
    assert len(fast("\n".join(LINES))["input_ids"]) > 5 * CONTEXT


@pytest.mark.parametrize("stride", [None, 1, 7, 16, CONTEXT - 1, CONTEXT])
def test_perplexity_matches_transformers(lm, stride):
    d, model, fast = lm
    text = "\n".join(LINES)
    ids = fast(text)["input_ids"]  # with what the tokenizer adds: Llama's <s>, GPT-2 nothing
    mean, n = rolling(model, ids) if stride is None else hf_guide(model, ids, stride)
    got = tasks.perplexity(str(d), LINES, stride=stride, batch_tokens=100)
    assert got["tokens"] == n
    assert got["loss"] == pytest.approx(mean, rel=1e-4)
    assert got["score"] == pytest.approx(math.exp(mean), rel=1e-4)
    n_bytes = len(text.encode("utf-8"))
    assert got["bytes"] == n_bytes
    assert got["bits_per_byte"] == pytest.approx(mean * n / math.log(2) / n_bytes, rel=1e-4)
    assert (got["context"], got["stride"], got["per_line"], got["n"]) == (CONTEXT, stride, False, len(LINES))


def test_a_stride_below_the_context_scores_every_token_once(lm):
    d, _, fast = lm
    n_ids = len(fast("\n".join(LINES))["input_ids"])
    for stride in (1, 5, CONTEXT - 1):
        assert tasks.perplexity(str(d), LINES, stride=stride)["tokens"] == n_ids - 1
    assert tasks.perplexity(str(d), LINES)["tokens"] == n_ids - 1


def test_batching_does_not_change_the_score(lm):
    d, _, _ = lm
    small = tasks.perplexity(str(d), LINES, stride=8, batch_tokens=1)
    large = tasks.perplexity(str(d), LINES, stride=8, batch_tokens=100_000)
    assert small["tokens"] == large["tokens"]
    assert small["loss"] == pytest.approx(large["loss"], rel=1e-5)


def test_per_line_is_each_line_a_document(lm):
    d, model, fast = lm
    mean, n = per_line(model, fast, LINES)
    got = tasks.perplexity(str(d), LINES, per_line=True)
    assert got["tokens"] == n and got["per_line"] is True
    assert got["loss"] == pytest.approx(mean, rel=1e-4)
    n_bytes = sum(len(line.encode("utf-8")) + 1 for line in LINES)
    assert got["bits_per_byte"] == pytest.approx(mean * n / math.log(2) / n_bytes, rel=1e-4)


def test_windows_cover_the_text():
    assert tasks.rolling_windows(5, 2) == [(0, 2, 1), (2, 4, 3)]
    assert tasks.rolling_windows(6, 2) == [(0, 2, 1), (2, 4, 3), (4, 5, 5)]
    # HF's loop, context 4, stride 2: windows [0,4) [2,6) [4,7); each scores after the last one's end
    assert tasks.strided_windows(7, 4, 2) == [(0, 3, 1), (2, 5, 4), (4, 6, 6)]
    # stride == context: the first token of each later window has no context there (as in HF)
    assert tasks.strided_windows(7, 3, 3) == [(0, 2, 1), (3, 5, 4)]  # token 3 and token 6 unscored


# ---------------------------------------------------------------- the command line


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_cli_json_and_table(lm, tmp_path):
    d, _, _ = lm
    path = tmp_path / "text.txt"
    path.write_text("".join(line + "\n" for line in LINES), encoding="utf-8")
    result = invoke("eval", "--metric", "perplexity", "-m", str(d), str(path), "--stride", "16", "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got == {"metric": "perplexity", **tasks.perplexity(str(d), LINES, stride=16)}
    table = invoke("eval", "--metric", "perplexity", "-m", str(d), str(path)).stdout
    for label in ("perplexity", "loss", "tokens", "bits per byte", "scoring", "lines"):
        assert any(row.startswith(label) for row in table.splitlines()), table
    assert "windows not overlapping" in table
    per_line = json.loads(invoke("eval", "--metric", "perplexity", "-m", str(d), str(path), "--per-line", "--json").stdout)
    assert per_line["per_line"] is True and per_line["tokens"] == tasks.perplexity(str(d), LINES, per_line=True)["tokens"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["{empty}"], "{empty} is empty"),
        (["{blank}"], "no text to score: every line is empty"),
        (["{text}", "--stride", "0"], "--stride 0 must be at least 1"),
        (["{text}", "--stride", "-3"], "--stride -3 must be at least 1"),
        (["{text}", "--stride", "33"], "--stride 33 is larger than the model's context of 32 tokens"),
        (["{text}", "--stride", "4", "--per-line"], "--stride windows the text as one stream"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(lm, tmp_path, args, message):
    d, _, _ = lm
    names = {"empty": tmp_path / "empty.txt", "blank": tmp_path / "blank.txt", "text": tmp_path / "text.txt"}
    names["empty"].write_text("", encoding="utf-8")
    names["blank"].write_text("\n\n", encoding="utf-8")
    names["text"].write_text("the cat sat\n", encoding="utf-8")
    names = {k: str(v) for k, v in names.items()}
    result = invoke("eval", "--metric", "perplexity", "-m", str(d), *[a.format(**names) for a in args])
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("llmcli: error: " + message.format(**names)), result.stderr
    assert result.stderr.count("\n") == 1


def test_stride_and_per_line_are_perplexity_options(tmp_path):
    hyp = tmp_path / "h.txt"
    hyp.write_text("a\n", encoding="utf-8")
    for option in (["--stride", "4"], ["--per-line"]):
        result = invoke("eval", str(hyp), "--ref", str(hyp), *option)
        assert result.exit_code == 2
        assert result.stderr.startswith(f"llmcli: error: {option[0]} does not apply to --metric bleu (only to perplexity)")


def test_library_checks_match_the_cli():
    with pytest.raises(UserError, match="--stride 0 must be at least 1"):
        tasks.perplexity("unused", ["text"], stride=0)


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout == f"llmcli {version('llmcli')}\n"
