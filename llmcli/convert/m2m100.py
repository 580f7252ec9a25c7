"""M2M100 (Fan et al. 2020) and NLLB-200 (NLLB Team 2022): many-to-many translation, one
model_type. BART's names; pre-norm with a final LayerNorm per stack, no LayerNorm on the
embeddings, embeddings scaled by sqrt(d_model), ReLU, one embedding matrix for everything.

Positions are fairseq's sinusoids: frequencies exp(-i ln(10000) / (d/2 - 1)), laid out
[sin | cos], and a row's t-th real token takes row pad_id + 1 + t of the table (transformers'
M2M100SinusoidalPositionalEmbedding), hence `position_offset=pad_id + 1`. The table is
computed, never stored.

Languages are special tokens: NLLB's `eng_Latn`, M2M100's `__en__` (code `en`). The source
text is `[src_lang] X </s>` (NLLB's legacy mode: `X </s> [src_lang]`); the target language is
forced as the first generated token, as transformers' `forced_bos_token_id`. generation.json
carries "languages" (code -> token id) and "source_lang", the code the source template holds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from llmcli.config import ModelConfig
from llmcli.convert import bart
from llmcli.convert.common import hf_tokenizer, is_tied, optional_prefix
from llmcli.errors import UserError
from llmcli.io import read_text
from llmcli.tokenizer import Tokenizer

MODEL_TYPES = ("m2m_100",)
ARCHITECTURES = ("M2M100ForConditionalGeneration", "M2M100Model")
TASK = "translate"

_M2M100_CODE = re.compile(r"^__([a-z]{2,3}(?:_[A-Za-z]+)?)__$")  # __en__ -> en
_NLLB_CODE = re.compile(r"^[a-z]{3}_[A-Z][a-z]{3}$")  # eng_Latn (FLORES-200 codes)
_DEFAULT_SOURCE = ("eng_Latn", "en")  # transformers' tokenizers default src_lang


def config(hf: dict, tensors: dict, gen: dict) -> ModelConfig:
    where = "config.json"
    fields = bart.common_fields(hf, tensors, gen, where)
    fields["scale_embeddings"] = bool(hf.get("scale_embedding", True))  # M2M100Config's default
    embed = "model.shared.weight" if "model.shared.weight" in tensors else "shared.weight"
    return ModelConfig(
        **fields, vocab_size=hf["vocab_size"], positions="sinusoidal", sinusoid_style="fairseq",
        position_offset=fields["pad_id"] + 1, embedding_norm=False, norm_position="pre", final_norm=True,
        shared_embeddings=True, tied_output=is_tied(tensors, "lm_head.weight", embed),
    )  # fmt: skip


def weight_map(hf: dict, cfg: ModelConfig) -> dict:
    names = bart.embedding_names(cfg) | bart.layer_names("encoder", cross=False) | bart.layer_names("decoder", cross=True)
    for side in ("encoder", "decoder"):
        for p in ("weight", "bias"):
            names[f"model.{side}.layer_norm.{p}"] = f"{side}.final_norm.{p}"
        names[f"model.{side}.embed_positions.weights"] = None  # computed (older files stored the table)
        names[f"model.{side}.embed_positions._float_tensor"] = None
    return optional_prefix("model.", names)


def tokenizers(src: Path, hf: dict, cfg: ModelConfig) -> tuple[Tokenizer, Tokenizer, dict]:
    if not (src / "tokenizer.json").is_file() and (src / "sentencepiece.bpe.model").is_file():
        raise UserError(f"{src}: M2M100's SentencePiece BPE tokenizer (sentencepiece.bpe.model, vocab.json) is not "
                        "converted yet; llmcli reads a tokenizer.json")  # fmt: skip
    tok, source_tok, facts = hf_tokenizer(src, {"pad": cfg.pad_id, "bos": cfg.bos_id, "eos": cfg.eos_id})
    languages = language_tokens(tok.hf)
    if not languages:
        return tok, source_tok, facts  # one language pair: a plain encoder-decoder
    settings = _tokenizer_config(src)
    ids = set(languages.values())
    in_template = [i for i in facts["prefix"] + facts["suffix"] if i in ids]
    by_id = {i: code for code, i in languages.items()}
    if settings.get("src_lang") in languages:
        default = settings["src_lang"]
    elif in_template:
        default = by_id[in_template[0]]
    else:
        default = next((c for c in _DEFAULT_SOURCE if c in languages), next(iter(languages)))
    if in_template:  # the template as saved, with its language swapped for the default
        prefix = [languages[default] if i in ids else i for i in facts["prefix"]]
        suffix = [languages[default] if i in ids else i for i in facts["suffix"]]
    elif settings.get("legacy_behaviour"):
        prefix, suffix = [], [cfg.eos_id, languages[default]]
    else:
        prefix, suffix = [languages[default]], [cfg.eos_id]
    facts = {**facts, "prefix": prefix, "suffix": suffix, "generation": {"languages": languages, "source_lang": default}}
    return tok, source_tok, facts


def language_tokens(hf_tok) -> dict[str, int]:
    """Language code -> token id, from the tokenizer's special added tokens."""
    out = {}
    for i, added in sorted(hf_tok.get_added_tokens_decoder().items()):
        if not added.special:
            continue
        if m := _M2M100_CODE.match(added.content):
            out[m.group(1)] = i
        elif _NLLB_CODE.match(added.content):
            out[added.content] = i
    return out


def _tokenizer_config(src: Path) -> dict:
    path = src / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    return data if isinstance(data, dict) else {}
