"""GGUF files read back: tiny random `transformers` Llama, Qwen2 (and Gemma 3) models and tokenizers
trained here, written with gguf's GGUFWriter as llama.cpp's convert_hf_to_gguf.py writes them
(its tensor names, metadata keys, q/k row permutation for Llama, norm + 1 for Gemma), as F32 and
as Q8_0, then converted by llmcli. No downloads."""

from __future__ import annotations

import math
import shutil
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from test_convert import CORPUS, hf_text, randomize, run, sentences  # noqa: E402
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import llmcli.convert  # noqa: E402
from llmcli import hub  # noqa: E402
from llmcli.cli import app  # noqa: E402
from llmcli.convert import convert  # noqa: E402
from llmcli.convert.gguf import _QWEN2  # noqa: E402
from llmcli.errors import UserError  # noqa: E402

SIZES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)  # fmt: skip  (rows of 64 and 128: whole Q8_0 blocks of 32)
TEXTS = ["Hello world, this is a test.", "你好，世界！今天天气很好。", "emoji 🙂🚀 and 👩‍👩‍👧 too", "  two  spaces\tand a tab"]
BYTES = [f"<0x{b:02X}>" for b in range(256)]
Q8_0_BOUND = 0.15  # of the largest logit: Q8_0 rounds each weight by up to 1/254 of its 32-block's largest; random
# weights this large (std 0.3, two layers) amplify it to ~9% of the largest logit here


# ---------------------------------------------------------------- tokenizers, and their GGUF metadata


def sentencepiece_style() -> HFTokenizer:
    """Llama's SentencePiece BPE: space marks, <s> first, byte fallback for what the vocabulary lacks."""
    import json

    tok = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=330, special_tokens=["<unk>", "<s>", "</s>", *BYTES],
                                                        show_progress=False))  # fmt: skip
    # Llama 2's tokenizer.json: the bytes are vocabulary, not added tokens; spaces are normalized
    # to space marks with one put first (SentencePiece's dummy prefix), no pre-tokenizer
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = spec["added_tokens"][:3]
    tok = HFTokenizer.from_str(json.dumps(spec))
    tok.pre_tokenizer = None
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])  # fmt: skip
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def byte_level() -> HFTokenizer:
    """Qwen2's byte-level BPE: its split, all 256 byte symbols, <|endoftext|> and chat tokens."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_QWEN2), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])  # fmt: skip
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)  # fmt: skip
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def write_tokenizer(w, tok: HFTokenizer, kind: str) -> None:
    """tokenizer.ggml.* as convert_hf_to_gguf.py's _set_vocab_sentencepiece / _set_vocab_gpt2 write them."""
    import json

    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {a.content for a in tok.get_added_tokens_decoder().values()}
    if kind == "llama":
        types = [2 if t == "<unk>" else 6 if t in BYTES else 3 if t in specials else 1 for t in tokens]
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_scores([-float(i) for i in range(len(tokens))])  # SentencePiece's: earlier pieces merge first
        w.add_bos_token_id(1), w.add_eos_token_id(2), w.add_unk_token_id(0)
        w.add_add_bos_token(True), w.add_add_space_prefix(True)
    else:
        types = [3 if t in specials else 1 for t in tokens]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        merges = json.loads(tok.to_str())["model"]["merges"]
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
        w.add_eos_token_id(0), w.add_pad_token_id(0), w.add_add_bos_token(False)
        w.add_chat_template("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")
    w.add_token_list(tokens)
    w.add_token_types(types)


# ---------------------------------------------------------------- models, written as llama.cpp writes them


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (q, k rows to Meta's interleaved rope)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def build(arch: str, **extra):
    """A tiny random model and its tokenizer."""
    torch.manual_seed(0)
    if arch == "llama":
        tok = sentencepiece_style()
        cfg = transformers.LlamaConfig(**SIZES, vocab_size=tok.get_vocab_size(), bos_token_id=1, eos_token_id=2,
                                       tie_word_embeddings=False, **extra)  # fmt: skip
        model, eos = transformers.LlamaForCausalLM(cfg), 2
    elif arch == "qwen2":
        tok = byte_level()
        cfg = transformers.Qwen2Config(**SIZES, vocab_size=tok.get_vocab_size(), bos_token_id=None, eos_token_id=0,
                                       tie_word_embeddings=True)  # fmt: skip
        model, eos = transformers.Qwen2ForCausalLM(cfg), 0
    elif arch == "qwen3":  # q and k norms, a head size of its own
        tok = byte_level()
        cfg = transformers.Qwen3Config(**SIZES, head_dim=32, vocab_size=tok.get_vocab_size(), bos_token_id=None,
                                       eos_token_id=0, tie_word_embeddings=True)  # fmt: skip
        model, eos = transformers.Qwen3ForCausalLM(cfg), 0
    elif arch == "gemma2":  # SentencePiece style, soft-capping, local and global layers alternating
        tok = sentencepiece_style()
        cfg = transformers.Gemma2Config(**SIZES, head_dim=16, vocab_size=tok.get_vocab_size(), bos_token_id=1,
                                        eos_token_id=2, pad_token_id=0, sliding_window=4, query_pre_attn_scalar=16,
                                        attn_logit_softcapping=50.0, final_logit_softcapping=30.0)  # fmt: skip
        model, eos = transformers.Gemma2ForCausalLM(cfg), 2
    else:  # gemma3: SentencePiece style too, with Gemma's special ids
        tok = sentencepiece_style()
        cfg = transformers.Gemma3TextConfig(**SIZES, head_dim=16, vocab_size=tok.get_vocab_size(), bos_token_id=1,
                                            eos_token_id=2, pad_token_id=0, sliding_window=4, query_pre_attn_scalar=16,
                                            sliding_window_pattern=2)  # fmt: skip
        model, eos = transformers.Gemma3ForCausalLM(cfg), 2
    randomize(model, eos, 2.0)
    with torch.no_grad():  # biases and norm weights off their init, so each one is tested
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0, 0.3) if name.endswith("bias") or arch.startswith("gemma") else p.uniform_(0.5, 1.5)
    return model.eval(), tok


def write_gguf(path, model, tok: HFTokenizer, arch: str, quant: str) -> dict[str, np.ndarray]:
    """The model as a GGUF file; returns the weights as llmcli should read them back (under HF names)."""
    c = model.config
    heads, kv, n_layers = c.num_attention_heads, c.num_key_value_heads, c.num_hidden_layers
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings), w.add_embedding_length(c.hidden_size)
    w.add_block_count(n_layers), w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(heads), w.add_head_count_kv(kv), w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if arch == "gemma3":
        w.add_rope_freq_base(c.rope_parameters["full_attention"]["rope_theta"])
        w.add_key_length(c.head_dim), w.add_value_length(c.head_dim), w.add_sliding_window(c.sliding_window)
        w.add_sliding_window_pattern([t == "sliding_attention" for t in c.layer_types])
    elif arch == "gemma2":
        w.add_rope_freq_base(c.rope_parameters["rope_theta"])
        w.add_key_length(c.head_dim), w.add_value_length(c.head_dim), w.add_sliding_window(c.sliding_window)
        w.add_attn_logit_softcapping(c.attn_logit_softcapping), w.add_final_logit_softcapping(c.final_logit_softcapping)
    elif arch == "qwen3":
        w.add_rope_freq_base(c.rope_parameters["rope_theta"])
        w.add_key_length(c.head_dim), w.add_value_length(c.head_dim)
    else:
        w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    if arch == "llama":
        w.add_rope_dimension_count(c.hidden_size // heads), w.add_vocab_size(c.vocab_size)
    write_tokenizer(w, tok, "gpt2" if arch.startswith("qwen") else "llama")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
    expected = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        data = t.float().numpy().copy()
        if arch == "llama" and ".q_proj." in name:
            data = permute(data, heads)
        elif arch == "llama" and ".k_proj." in name:
            data = permute(data, kv)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            data = data + 1
        # as convert_hf_to_gguf.py --outtype: matrices in the type, vectors (norms, biases) F32
        kind = gguf.GGMLQuantizationType[quant if data.ndim == 2 else "F32"]
        stored = gguf.quants.quantize(data, kind)
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), stored, raw_dtype=kind)
        expected[name] = gguf.quants.dequantize(stored, kind).reshape(t.shape)
    rope = c.rope_parameters if arch == "llama" else {}
    if rope.get("rope_type") == "llama3":  # LlamaModel.generate_extra_tensors: factors, not parameters
        w.add_tensor("rope_freqs.weight", llama3_factors(rope, c.hidden_size // heads))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    # what the file holds, in HF's layout again: llmcli must undo exactly this
    for name, data in expected.items():
        if arch == "llama" and ".q_proj." in name:
            expected[name] = unpermute_reference(data, heads)
        elif arch == "llama" and ".k_proj." in name:
            expected[name] = unpermute_reference(data, kv)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            expected[name] = data - 1
    return expected


def llama3_factors(rope: dict, dim: int) -> np.ndarray:
    """convert_hf_to_gguf.py's rope factors for Llama 3.1's scaling (8192 original positions, its default)."""
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high, old = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"], 8192
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        smooth = (old / wavelen - low) / (high - low)
        out.append(1 if wavelen < old / high else factor if wavelen > old / low else 1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def unpermute_reference(w: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' `_reverse_permute_weights`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


ARCHS = ["llama", "qwen2", "qwen3"] + [pytest.param(arch, marks=pytest.mark.skipif(
    model_type not in llmcli.convert.FAMILIES, reason=f"llmcli.convert has no {model_type} family yet"))
    for arch, model_type in (("gemma2", "gemma2"), ("gemma3", "gemma3_text"))]  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(arch, quant) -> (path, HF model, tokenizer, HF model holding the file's dequantized weights)."""
    cache = {}

    def get(arch: str, quant: str):
        if (arch, quant) not in cache:
            model, tok = cache[arch] if arch in cache else cache.setdefault(arch, build(arch))
            path = tmp_path_factory.mktemp(arch) / f"tiny-{arch}-{quant}.gguf"
            expected = write_gguf(path, model, tok, arch, quant)
            same = model
            if quant != "F32":
                same = type(model)(model.config).eval()
                same.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in expected.items()}, strict=False)
                if model.config.tie_word_embeddings:
                    same.tie_weights()
            cache[arch, quant] = (path, model, tok, same)
        return cache[arch, quant]

    return get


def token_rows(tok: HFTokenizer, n: int = 4) -> torch.Tensor:
    rows = [tok.encode(t).ids[:10] for t in sentences(n, 3)]
    width = min(map(len, rows))
    return torch.tensor([r[:width] for r in rows])


# ---------------------------------------------------------------- logits


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_equal_the_source_for_f32_and_within_q8_0_rounding(files, arch):
    path, model, tok, _ = files(arch, "F32")
    tokens = token_rows(tok)
    with torch.inference_mode():
        theirs = model(input_ids=tokens).logits
        f32 = convert(path).model(tokens)
        torch.testing.assert_close(f32, theirs, atol=1e-5, rtol=0)
        qpath, _, _, dequantized = files(arch, "Q8_0")
        q8 = convert(qpath).model(tokens)
        # the Q8_0 file read exactly: the same logits as transformers on the same dequantized weights
        reference = dequantized(input_ids=tokens).logits
        torch.testing.assert_close(q8, reference, atol=1e-5, rtol=0)
        error = (q8 - theirs).abs().max().item()
    print(f"{arch}: max |logit diff| F32 {(f32 - theirs).abs().max().item():.2e}, Q8_0 {error:.2e} against the F32 "
          f"source (logits up to {theirs.abs().max().item():.1f}), {(q8 - reference).abs().max().item():.2e} against "
          "transformers on the dequantized weights")  # fmt: skip
    assert 0 < error < Q8_0_BOUND * theirs.abs().max().item()


@pytest.mark.parametrize("quant", ["F16", "BF16", "Q4_0"])
def test_other_types_are_read_exactly_as_gguf_dequantizes_them(files, quant):
    path, _, tok, dequantized = files("qwen2", quant)
    tokens = token_rows(tok)
    with torch.inference_mode():
        torch.testing.assert_close(convert(path).model(tokens), dequantized(input_ids=tokens).logits, atol=1e-5, rtol=0)


def test_llama3_rope_scaling_comes_back_from_its_rope_factors(tmp_path):
    rope = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=8192)  # fmt: skip
    model, tok = build("llama", rope_parameters=rope)
    write_gguf(tmp_path / "l3.gguf", model, tok, "llama", "F32")
    ours = convert(tmp_path / "l3.gguf").model
    assert (ours.cfg.rope_scaling, ours.cfg.rope_factor) == ("llama3", 8.0)
    tokens = token_rows(tok)
    with torch.inference_mode():
        torch.testing.assert_close(ours(tokens), model(input_ids=tokens).logits, atol=1e-5, rtol=0)


def test_configs_are_what_the_metadata_says(files):
    llama = convert(files("llama", "F32")[0])
    qwen = convert(files("qwen2", "F32")[0])
    assert (llama.config.n_kv_heads, llama.config.tied_output, llama.config.bos_id, llama.config.eos_id) == (2, False, 1, 2)
    assert qwen.config.qkv_bias and qwen.config.tied_output and qwen.config.eos_id == 0
    assert llama.generation["prompt_prefix"] == [1] and qwen.generation["prompt_prefix"] == []
    assert "<|im_start|>" in qwen.generation["chat_template"] and qwen.generation["stop_ids"] == [0]
    assert llama.generation["converted_from"]["model_type"] == "llama"


# ---------------------------------------------------------------- tokenizers


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_tokenizer_round_trips_english_chinese_and_emoji(files, arch):
    path, _, tok, _ = files(arch, "F32")
    ours = convert(path).tokenizer
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == tok.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ids) == text
    assert len(ours.encode(TEXTS[1])) > 6  # Chinese through bytes (llama) or byte symbols (qwen2), not unknown
    assert ours.unk_id is None or ours.unk_id not in ours.encode(TEXTS[1] + TEXTS[2])


# ---------------------------------------------------------------- the CLI, and the cache


def test_cli_greedy_text_matches_transformers(files, tmp_path):
    """-m file.gguf: Llama's <s> put first, SentencePiece pieces and bytes decoded, as transformers does."""
    path, model, tok, _ = files("llama", "F32")
    texts = sentences(8, 22)
    (tmp_path / "prompts.txt").write_text("\n".join(texts) + "\n")
    mine = run("generate", "-m", str(path), "--input", str(tmp_path / "prompts.txt"), "--greedy", "--max-new-tokens", "8", "-q")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert mine == hf_text(fast, model, texts, max_new_tokens=8)
    assert len(set(mine)) >= 3


def test_a_converted_gguf_is_cached_by_name_size_and_time(files, tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    shutil.copy(files("llama", "F32")[0], path)
    first = hub.resolve(str(path))
    assert (first / "model.safetensors").is_file()
    monkeypatch.setattr(hub, "convert", lambda src: pytest.fail("converted twice"))
    assert hub.resolve(str(path)) == first
    st = path.stat()
    import os

    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert hub.converted_path(path) != first


def test_convert_command_writes_an_llmcli_directory(files, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["convert", str(files("qwen2", "Q8_0")[0]), str(out)])
    assert result.exit_code == 0, result.output
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation.json"} <= {p.name for p in out.iterdir()}


# ---------------------------------------------------------------- one line each


def one_line(path) -> str:
    with pytest.raises(UserError) as e:
        convert(path)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_truncated_file_is_one_line(files, tmp_path):
    data = files("llama", "F32")[0].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) * 2 // 3])
    assert "truncated" in one_line(cut)
    cut.write_bytes(data[:1000])  # inside the metadata
    assert "truncated" in one_line(cut)
    result = CliRunner().invoke(app, ["convert", str(cut), str(tmp_path / "out")])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "llmcli: error:" in result.output


def test_an_unknown_architecture_is_one_line(tmp_path):
    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    assert "unknown GGUF architecture 'mamba'" in one_line(path)


def test_an_unsupported_quantization_type_is_one_line(files, tmp_path):
    """Q8_K (llama.cpp's intermediate type for K-quant dot products) is one gguf cannot dequantize."""
    reader = gguf.GGUFReader(files("llama", "F32")[0])
    w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
    for name, field in reader.fields.items():
        if not name.startswith("GGUF.") and name != "general.architecture":
            w.add_key_value(name, field.contents(), field.types[0], field.types[-1] if len(field.types) > 1 else None)
    for t in reader.tensors:
        if t.name == "token_embd.weight":  # 256 values a row: one Q8_K block of 292 bytes
            w.add_tensor(t.name, np.zeros((t.data.shape[0], 292), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_K)
        else:
            w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    message = one_line(tmp_path / "bad.gguf")
    assert "Q8_K" in message and "token_embd.weight" in message


def test_without_the_gguf_package_one_line_says_how_to_install_it(files, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    assert "pip install 'llmcli[gguf]'" in one_line(files("llama", "F32")[0])
