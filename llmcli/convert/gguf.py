"""GGUF files (llama.cpp, Ollama) read into what a Hugging Face directory holds: their config
as a dict, their tensors under Hugging Face's names, a `tokenizers` Tokenizer, generation and
chat settings. The family modules then convert them as they convert a directory, so a GGUF
adds data here and no second conversion path: `convert.convert_parts` takes what `read` returns.

Undone on the way back, as transformers' `modeling_gguf_pytorch_utils.py` undoes it:
- llama.cpp's convert_hf_to_gguf.py permutes the rows of q and k for the "llama" architecture
  (back to Meta's interleaved rotary layout; `LlamaModel.permute`); Qwen and Gemma keep
  Hugging Face's rotate-half layout (llama.cpp's NEOX rope) and are not permuted;
- Gemma stores its RMSNorm weights as 1 + weight (llama.cpp's RMSNorm has no offset);
- every tensor is dequantized to float32 by `gguf.quants.dequantize` (F32, F16, BF16, Q8_0,
  Q4_0/1, Q5_0/1, the K-quants, the IQ types); a type it cannot dequantize is one line.

Needs the `gguf` package (`pip install 'llmcli[gguf]'`), imported only when a GGUF is read.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import Tensor

from llmcli.errors import UserError

MAGIC = b"GGUF"
INSTALL = "reading GGUF files needs the gguf package: pip install 'llmcli[gguf]' (or pip install gguf)"


def is_gguf(path: Path) -> bool:
    """A GGUF file: named *.gguf, or starting with the GGUF magic."""
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


# ---------------------------------------------------------------- architectures

# general.architecture -> their model_type and class; `permute`: q and k rows were permuted
# (convert_hf_to_gguf.py's LlamaModel); `norm_shift`: norm weights stored as 1 + weight;
# `sandwich`: Gemma 2 and 3's four norms a layer, named by SANDWICH over TENSORS.
ARCHITECTURES: dict[str, dict] = {
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], permute=True),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"]),
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"]),
    "gemma": dict(model_type="gemma", architectures=["GemmaForCausalLM"], norm_shift=1.0),
    "gemma2": dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"], norm_shift=1.0, sandwich=True),
    "gemma3": dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], norm_shift=1.0, sandwich=True),
}

# GGUF tensor names (gguf-py's constants.TENSOR_NAMES) -> Hugging Face's; {} is the layer index
TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.attn_q.bias": "model.layers.{}.self_attn.q_proj.bias",
    "blk.{}.attn_k.bias": "model.layers.{}.self_attn.k_proj.bias",
    "blk.{}.attn_v.bias": "model.layers.{}.self_attn.v_proj.bias",
    "blk.{}.attn_output.bias": "model.layers.{}.self_attn.o_proj.bias",
    "blk.{}.attn_q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
    "blk.{}.attn_k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
    "blk.{}.ffn_gate.bias": "model.layers.{}.mlp.gate_proj.bias",
    "blk.{}.ffn_up.bias": "model.layers.{}.mlp.up_proj.bias",
    "blk.{}.ffn_down.bias": "model.layers.{}.mlp.down_proj.bias",
}
# Gemma 2 and 3: norms before and after attention and the FFN ("sandwich")
SANDWICH = {
    "blk.{}.post_attention_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.pre_feedforward_layernorm.weight",
    "blk.{}.post_ffw_norm.weight": "model.layers.{}.post_feedforward_layernorm.weight",
}
_LAYER = re.compile(r"blk\.(\d+)\.(.+)")


def hf_name(name: str, arch: dict) -> str:
    """Hugging Face's name for a GGUF tensor; an unknown one keeps its GGUF name, which the
    conversion then reports as unexpected."""
    table = {**TENSORS, **SANDWICH} if arch.get("sandwich") else TENSORS
    m = _LAYER.fullmatch(name)
    key, index = ("blk.{}." + m.group(2), m.group(1)) if m else (name, None)
    if key not in table:
        return name
    return table[key].format(index) if index is not None else table[key]


# ---------------------------------------------------------------- reading the file


def _open(path: Path):
    try:
        import gguf  # noqa: F401
        from gguf import GGUFReader
    except ImportError:
        raise UserError(f"{path}: {INSTALL}") from None
    try:
        with open(path, "rb") as f:
            if f.read(4) != MAGIC:
                raise UserError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
        return GGUFReader(path)
    except UserError:
        raise
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError) as e:
        # a cut-off file ends inside the metadata or the tensor data; gguf says so as a bad reshape or index
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a complete GGUF file (truncated or corrupt: {reason})") from None


def metadata(reader) -> dict:
    """Every key/value of the file as Python values (lists for arrays)."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def dequantized(tensor, path: Path) -> Tensor:
    """A GGUF tensor as float32 in its Hugging Face shape (numpy order: ggml's ne reversed)."""
    import numpy as np  # gguf's own dependency
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    kind = GGMLQuantizationType(tensor.tensor_type)
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    if kind in (GGMLQuantizationType.I8, GGMLQuantizationType.I16, GGMLQuantizationType.I32, GGMLQuantizationType.I64):
        raise UserError(f"{path}: tensor {tensor.name} holds integers ({kind.name}), not weights llmcli can read")
    try:
        values = dequantize(tensor.data, kind)
    except NotImplementedError:
        raise UserError(f"{path}: tensor {tensor.name} is quantized as {kind.name}, which gguf cannot dequantize "
                        "(llmcli reads F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1, the K-quants and IQ types)") from None  # fmt: skip
    # the file is memory-mapped read-only (F32 comes back as a view of it): the model must own its weights
    if values.dtype != np.float32 or np.may_share_memory(values, tensor.data) or not values.flags.writeable:
        values = values.astype(np.float32)
    return torch.from_numpy(values.reshape(shape))


def unpermute(t: Tensor, n_heads: int) -> Tensor:
    """Undo convert_hf_to_gguf.py's `LlamaModel.permute` of q or k rows (weight or bias)."""
    rows = t.shape[0]
    if rows % (2 * n_heads):
        return t  # the shape check of the conversion names it
    return t.reshape(n_heads, rows // n_heads // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape).contiguous()


def read(path: str | Path) -> tuple[dict, dict[str, Tensor], object, dict, dict]:
    """(their config, their tensors, a tokenizers.Tokenizer, generation settings, chat settings)
    of a GGUF file, as a Hugging Face directory would give them."""
    path = Path(path)
    reader = _open(path)
    meta = metadata(reader)
    name = meta.get("general.architecture")
    if name not in ARCHITECTURES:
        raise UserError(f"{path}: unknown GGUF architecture {name!r}; llmcli reads {', '.join(ARCHITECTURES)}")
    arch = ARCHITECTURES[name]
    tensors: dict[str, Tensor] = {}
    rope_factors = None
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            rope_factors = dequantized(t, path)
        else:
            tensors[hf_name(t.name, arch)] = dequantized(t, path)
    del reader
    hf = config(meta, name, arch, tensors, path)
    if rope_factors is not None:
        hf["rope_scaling"] = llama3_scaling(rope_factors, hf, path)
    if arch.get("permute"):
        heads, kv = hf["num_attention_heads"], hf["num_key_value_heads"]
        for key, t in tensors.items():
            if ".self_attn.q_proj." in key:
                tensors[key] = unpermute(t, heads)
            elif ".self_attn.k_proj." in key:
                tensors[key] = unpermute(t, kv)
    if arch.get("norm_shift"):
        for key, t in tensors.items():
            if key.endswith("norm.weight"):
                tensors[key] = t - arch["norm_shift"]
    tokenizer, gen, chat = tokenizer_parts(meta, path, hf["vocab_size"])
    eos = gen.get("eos_token_id")
    hf.update(bos_token_id=gen.get("bos_token_id"), eos_token_id=eos[0] if isinstance(eos, list) else eos,
              pad_token_id=gen.get("pad_token_id"))  # fmt: skip
    return hf, tensors, tokenizer, gen, chat


def llama3_scaling(factors: Tensor, hf: dict, path: Path) -> dict:
    """Llama 3.1's rope scaling from the factors per frequency llama.cpp stores instead of its
    parameters (convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors): the factor is the
    largest; low_freq_factor 1, high_freq_factor 4 and 8192 original positions are what every
    Llama 3.x uses (and llama.cpp's defaults), accepted only if they give the stored factors again."""
    factor = float(factors.max())
    params = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}  # fmt: skip
    dim = hf["head_dim"]
    freqs = 1.0 / (hf.get("rope_theta", 10000.0) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    wavelen = 2 * math.pi / freqs
    old, low, high = 8192, 1.0, 4.0
    smooth = (old / wavelen - low) / (high - low)
    expected = torch.where(
        wavelen < old / high, 1.0, torch.where(wavelen > old / low, factor, 1 / ((1 - smooth) / factor + smooth))
    )
    if factors.shape != expected.shape or not torch.allclose(factors.double(), expected, rtol=1e-5, atol=0):
        raise UserError(f"{path}: rope_freqs.weight holds rotary factors llmcli cannot match to Llama 3's scaling parameters")
    return params


# ---------------------------------------------------------------- metadata -> their config.json


def _int(value, key: str, path: Path) -> int:
    if isinstance(value, list):  # per layer (some files write head counts per layer)
        if len(set(value)) != 1:
            raise UserError(f"{path}: {key} differs between layers ({', '.join(map(str, value[:8]))}...); llmcli needs one value")
        value = value[0]
    return int(value)


def config(meta: dict, name: str, arch: dict, tensors: dict[str, Tensor], path: Path) -> dict:
    """Their config.json, from the `{arch}.*` keys, as convert_hf_to_gguf.py wrote them."""

    def get(key: str, default=None):
        return meta.get(f"{name}.{key}", default)

    def need(key: str):
        value = get(key)
        if value is None:
            raise UserError(f"{path}: the GGUF has no {name}.{key}")
        return value

    def number(key: str, default=None) -> int:
        return _int(need(key) if default is None else get(key, default), f"{name}.{key}", path)

    d, heads, n_layers, d_ff = (
        number(k) for k in ("embedding_length", "attention.head_count", "block_count", "feed_forward_length")
    )
    kv = number("attention.head_count_kv", heads)
    embed = tensors.get("model.embed_tokens.weight")
    if embed is None:
        raise UserError(f"{path}: the GGUF has no token_embd.weight")
    # llama.cpp's head size: key_length, else rope.dimension_count (llama), else d / heads
    head_dim = get("attention.key_length") or (get("rope.dimension_count") if name == "llama" else None) or d // heads
    hf = {
        "model_type": arch["model_type"], "architectures": arch["architectures"], "vocab_size": int(embed.shape[0]),
        "hidden_size": d, "intermediate_size": d_ff, "num_hidden_layers": n_layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "head_dim": int(head_dim), "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "hidden_act": "silu",
    }  # fmt: skip
    if get("rope.freq_base") is not None:
        hf["rope_theta"] = float(get("rope.freq_base"))
    scaling = get("rope.scaling.type")
    if scaling and scaling != "none":
        params = {"rope_type": scaling, "factor": float(need("rope.scaling.factor"))}
        if get("rope.scaling.original_context_length") is not None:
            params["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
        for key in ("beta_fast", "beta_slow"):
            if get(f"rope.scaling.yarn_{key}") is not None:
                params[key] = float(get(f"rope.scaling.yarn_{key}"))
        hf["rope_scaling"] = params
    if name == "llama":
        bias = "model.layers.0.self_attn.q_proj.bias" in tensors
        hf.update(attention_bias=bias, mlp_bias="model.layers.0.mlp.up_proj.bias" in tensors)
    elif name in ("qwen2", "qwen3"):
        hf.update(use_sliding_window=False, sliding_window=None)
    else:  # the Gemmas
        hf.update(hidden_activation="gelu_pytorch_tanh", hidden_act="gelu_pytorch_tanh")
        hf.update(_gemma(get, name, hf, path))
    return hf


def _gemma(get, name: str, hf: dict, path: Path) -> dict:
    """Gemma 2 and 3's keys. llama.cpp scales queries by 1/sqrt(n_embd / n_head) for the 27B
    models (Gemma 2: 46 layers, Gemma 3: 62) and 1/sqrt(head_dim) otherwise (llama-model.cpp),
    as their query_pre_attn_scalar says; it writes no pattern for Gemma 3's local layers (every
    sixth is global), nor their rope base (10000)."""
    if name == "gemma":
        return {}
    n_layers = hf["num_hidden_layers"]
    big = {"gemma2": 46, "gemma3": 62}[name] == n_layers
    out = {"query_pre_attn_scalar": hf["hidden_size"] // hf["num_attention_heads"] if big else hf["head_dim"],
           "sliding_window": get("attention.sliding_window"),
           "final_logit_softcapping": get("final_logit_softcapping"),
           "attn_logit_softcapping": get("attn_logit_softcapping")}  # fmt: skip
    if name == "gemma2":
        out["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
        return out
    pattern = get("attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):  # per layer: True for a local layer
        if len(pattern) != n_layers:
            raise UserError(f"{path}: gemma3.attention.sliding_window_pattern has {len(pattern)} values for {n_layers} layers")
        types = ["sliding_attention" if p else "full_attention" for p in pattern]
    else:
        types = ["sliding_attention" if (i + 1) % int(pattern) else "full_attention" for i in range(n_layers)]
    out.update(layer_types=types, rope_local_base_freq=float(get("rope.freq_base_swa", 10000.0)),
               rope_theta=hf.get("rope_theta", 1_000_000.0))  # fmt: skip
    if isinstance(pattern, int):
        out["sliding_window_pattern"] = pattern
    return out


# ---------------------------------------------------------------- tokenizer.ggml.* -> a tokenizers.Tokenizer

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # llama.cpp's token types
SPACE = "\u2581"  # SentencePiece's space mark

# tokenizer.ggml.pre -> the split before byte-level BPE (llama.cpp's llama-vocab.cpp regexes;
# transformers' gguf_tokenizer_mapping.py). None: GPT-2's own, in ByteLevel.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")  # fmt: skip
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")  # fmt: skip
PRE_TOKENIZERS = {"default": None, "gpt-2": None, "gpt2": None, "smollm": "digits",
                  "llama3": _LLAMA3, "llama-v3": _LLAMA3, "llama-bpe": _LLAMA3, "smaug-bpe": _LLAMA3, "dbrx": _LLAMA3,
                  "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2, "megrez": _QWEN2}  # fmt: skip


def tokenizer_parts(meta: dict, path: Path, n_embeddings: int):
    """(a tokenizers.Tokenizer, generation settings with the special ids, chat settings)."""
    import tokenizers
    from tokenizers import AddedToken, processors

    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise UserError(f"{path}: the GGUF has no tokenizer (tokenizer.ggml.tokens)")
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(tokens) > n_embeddings:
        raise UserError(f"{path}: the tokenizer has {len(tokens)} tokens but the model only {n_embeddings}")
    arch = meta.get("general.architecture", "")
    if kind == "llama":
        tok = _sentencepiece(meta, tokens, types, gemma=arch.startswith("gemma"))
        add_bos_default = True  # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise
    elif kind == "gpt2":
        tok = _byte_level(meta, tokens, path)
        add_bos_default = False
    else:
        raise UserError(f"{path}: GGUF tokenizer {kind!r} is not supported (llmcli reads 'llama' and 'gpt2')")
    # control tokens whole and special, user-defined ones whole (llama.cpp matches both in text)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types) if k == CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types) if k == USER_DEFINED])

    def token_id(key: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{key}")
        return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

    bos, eos, pad = token_id("bos_token_id"), token_id("eos_token_id"), token_id("padding_token_id")
    ends = [i for i in (eos, token_id("eot_token_id"), token_id("eom_token_id")) if i is not None]
    gen = {"bos_token_id": bos, "eos_token_id": ends[0] if len(ends) == 1 else ends or None, "pad_token_id": pad}
    gen = {k: v for k, v in gen.items() if v is not None}
    add_bos = meta.get("tokenizer.ggml.add_bos_token", add_bos_default) and bos is not None
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False) and eos is not None
    single = ([f"{tokens[bos]}:0"] if add_bos else []) + ["$A:0"] + ([f"{tokens[eos]}:0"] if add_eos else [])
    specials = {tokens[i]: i for i in ((bos,) if add_bos else ()) + ((eos,) if add_eos else ())}
    tok.post_processor = processors.TemplateProcessing(single=" ".join(single), special_tokens=list(specials.items()))
    chat = {}
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str):
        roles = {"bos_token": bos, "eos_token": eos, "unk_token": token_id("unknown_token_id"), "pad_token": pad}
        chat = {"chat_template": template, "chat_tokens": {role: tokens[i] for role, i in roles.items() if i is not None},
                "stop_ids": list(dict.fromkeys(ends))}  # fmt: skip
    assert isinstance(tok, tokenizers.Tokenizer)
    return tok, gen, chat


def _sentencepiece(meta: dict, tokens: list[str], types: list[int], gemma: bool):
    """SentencePiece BPE with byte fallback, as transformers' LlamaTokenizer and GemmaTokenizer
    build it; merges from the file, else recovered from the scores (best merged piece first)."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    if gemma:  # Gemma stores a run of spaces as spaces, and looks it up as space marks
        tokens = [SPACE * len(t) if t and not t.strip(" ") else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = meta.get("tokenizer.ggml.merges")
    if merges:
        merges = [tuple(m.split(" ", 1)) for m in merges]
    else:
        # Gemma's scores do not follow its merge order, its file order does (transformers' gemma_tokenizer)
        scores = [-float(i) for i in range(len(tokens))] if gemma else meta.get("tokenizer.ggml.scores")
        scores = scores or [0.0] * len(tokens)
        merges = _merges(tokens, types, scores, vocab)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    # spaces become space marks; llama.cpp puts one before the text and after each control token
    # (add_space_prefix), as SentencePiece's dummy prefix does: Llama 2's tokenizer.json normalizer
    spaces = normalizers.Replace(" ", SPACE)
    if not gemma and meta.get("tokenizer.ggml.add_space_prefix", True):
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), spaces])
        steps.append(decoders.Strip(content=" ", left=1))
    else:
        tok.normalizer = spaces
    tok.decoder = decoders.Sequence(steps)
    return tok


def _merges(tokens: list[str], types: list[int], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges the pair whose joined piece scores best; as a BPE merge list,
    every split of a normal piece into two pieces, ranked by that piece's score (transformers'
    `generate_merges`). Only normal pieces merge: never control, byte, unknown or unused ones."""
    mergeable = {t for t, k in zip(tokens, types) if k == NORMAL}
    found = []
    for piece, score in zip(tokens, scores):
        if piece not in mergeable:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                found.append((-score, vocab[left], vocab[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _byte_level(meta: dict, tokens: list[str], path: Path):
    """Byte-level BPE (GPT-2, Llama 3, Qwen), with the split its `tokenizer.ggml.pre` names."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise UserError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported (llmcli reads {', '.join(PRE_TOKENIZERS)})")
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    split = PRE_TOKENIZERS[pre]
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    return tok
