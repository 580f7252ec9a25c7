"""MarianMT (Junczys-Dowmunt et al. 2018; Helsinki-NLP's OPUS-MT): BART's layout and names,
with what differs: sinusoidal positions laid out [sin | cos] (computed, so their copy is
dropped), embeddings scaled by sqrt(d_model), no LayerNorm on the embeddings, and
possibly separate source and target vocabularies. Its tokenizer is two SentencePiece
models and a vocab.json, converted here into tokenizer.json files (see `spm.py`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llmcli.config import ModelConfig
from llmcli.convert import bart, spm
from llmcli.convert.common import hf_tokenizer, is_tied, optional_prefix
from llmcli.errors import UserError
from llmcli.io import read_text
from llmcli.model import sinusoidal_table
from llmcli.tokenizer import Tokenizer

MODEL_TYPES = ("marian",)
ARCHITECTURES = ("MarianMTModel", "MarianModel")
TASK = "translate"


def config(hf: dict, tensors: dict, gen: dict) -> ModelConfig:
    where = "config.json"
    shared = bool(hf.get("share_encoder_decoder_embeddings", True))
    decoder_vocab = hf.get("decoder_vocab_size") or hf["vocab_size"]
    if shared and decoder_vocab != hf["vocab_size"]:
        raise UserError(f"{where}: shared embeddings with vocab_size={hf['vocab_size']} != decoder_vocab_size={decoder_vocab}")
    embed = "model.shared.weight" if shared else "model.decoder.embed_tokens.weight"
    return ModelConfig(
        **bart.common_fields(hf, tensors, gen, where), vocab_size=hf["vocab_size"],
        tgt_vocab_size=None if shared else decoder_vocab, positions="sinusoidal", embedding_norm=False,
        norm_position="post", final_norm=False, shared_embeddings=shared,
        tied_output=is_tied(tensors, "lm_head.weight", embed),
    )  # fmt: skip


def weight_map(hf: dict, cfg: ModelConfig) -> dict:
    names = bart.embedding_names(cfg) | bart.layer_names("encoder", cross=False) | bart.layer_names("decoder", cross=True)
    for side in ("encoder", "decoder"):  # sinusoids: we compute them, after checking theirs are the same
        names[f"model.{side}.embed_positions.weight"] = ((), _same_sinusoids(f"model.{side}.embed_positions.weight"))
    return optional_prefix("model.", names)


def _same_sinusoids(name: str):
    def check(table: torch.Tensor) -> list:
        ours = sinusoidal_table(table.shape[0], table.shape[1])
        if not torch.allclose(table.float(), ours, atol=1e-3):
            raise UserError(f"{name}: not the sinusoid table Marian computes (llmcli computes its positions)")
        return []

    return check


def tokenizers(src: Path, hf: dict, cfg: ModelConfig) -> tuple[Tokenizer, Tokenizer, dict]:
    files = ("source.spm", "target.spm", "vocab.json")
    if (src / "tokenizer.json").is_file() and not all((src / f).is_file() for f in files):
        return hf_tokenizer(src, {"pad": cfg.pad_id, "bos": cfg.pad_id, "eos": cfg.eos_id})
    for name in files:
        if not (src / name).is_file():
            raise UserError(f"{src}: missing {name} (Marian's tokenizer is source.spm, target.spm and vocab.json)")
    settings = {}
    if (src / "tokenizer_config.json").is_file():
        settings = json.loads(read_text(src / "tokenizer_config.json"))
    source_vocab = _vocab(src / "vocab.json")
    target_vocab = _vocab(src / "target_vocab.json") if settings.get("separate_vocabs") else source_vocab
    names = {role: _name(settings.get(f"{role}_token"), default) for role, default in
             (("pad", "<pad>"), ("eos", "</s>"), ("unk", "<unk>"))}  # fmt: skip
    source = spm.unigram_tokenizer(src / "source.spm", source_vocab, set(names.values()), for_encoding=True)
    target = spm.unigram_tokenizer(src / "target.spm", target_vocab, set(names.values()), for_encoding=False)
    # Marian has no start-of-text token: the pad, its decoder start, stands in for it
    special = {"pad": names["pad"], "bos": names["pad"], "eos": names["eos"], "unk": names["unk"]}
    source_tok = Tokenizer.from_hf(source, **special, source=str(src / "source.spm"))
    target_tok = Tokenizer.from_hf(target, **special, source=str(src / "target.spm"))
    return target_tok, source_tok, {"special_tokens": special, "prefix": [], "suffix": [cfg.eos_id]}


def _name(value, default: str) -> str:
    if isinstance(value, dict):  # a serialized AddedToken
        value = value.get("content")
    return value if isinstance(value, str) else default


def _vocab(path: Path) -> dict[str, int]:
    try:
        vocab = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise UserError(f"{path}: expected a JSON object from piece to id")
    return vocab
