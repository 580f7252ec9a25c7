"""Hugging Face checkpoints to llmcli models: one small module per family, one generic loop.

A family module (marian, bart, t5, gpt2, llama, bert, m2m100, phi3, qwen2, qwen3,
mistral, gemma, gemma2, gemma3) holds data, as litgpt's
`convert_hf_checkpoint.py` and CTranslate2's `converters/transformers.py` do:
  MODEL_TYPES                          the HF `model_type` values it reads
  config(hf, tensors, gen) -> ModelConfig
                                       their config.json (a dict) to our fields; the tensors
                                       say whether the output matrix is tied, gen holds their
                                       generation settings (special token ids)
  weight_map(hf, cfg) -> dict          their tensor names to ours: `{}` stands for a layer
                                       index; a value is our name, None (dropped on purpose),
                                       or (our name or names, transform)
and optionally `tokenizers(src, hf, cfg)` when the model ships no tokenizer.json (Marian's
SentencePiece files, converted by `spm.py`).

A GGUF file (llama.cpp) is read by `gguf.py` into what a directory holds (their config dict,
tensors under their names, a tokenizers.Tokenizer) and converted by the same family modules
through `convert_parts`.

`common.apply_map` is the one loop: afterwards every source tensor was used or dropped and
every parameter of ours was filled with the right shape, or it fails once, naming them all.
The helpers the families share live in `common.py`; this module picks the family and puts
model, tokenizers and generation settings together.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

from llmcli.checkpoint import LoadedModel, build_for_loading, load_state_into, model_tensors, save_model
from llmcli.convert import bart, bert, gemma, gemma2, gemma3, gguf, gpt2, llama, m2m100, marian, mistral, phi3, qwen2, qwen3, t5
from llmcli.convert.common import (
    apply_map,
    chat_settings,
    generation_settings,
    hf_tokenizer,
    read_generation_config,
    read_hf_config,
    read_weights,
    special_names,
    template,
)
from llmcli.convert.gguf import is_gguf
from llmcli.errors import UserError
from llmcli.model import Transformer
from llmcli.tokenizer import Tokenizer

VERSION = "7"  # bump when a family's output changes: converted models cached by hub.py are redone
# (3: chat templates, stop ids and sampling defaults in generation.json; 4: M2M100/NLLB, Phi-3;
# 5: Qwen2, Qwen3, Mistral, Gemma; 6: rope scaling fields, linear/dynamic/llama3/yarn;
# 7: Gemma 2, Gemma 3 (text; multimodal files' text model), Phi-3 longrope; layer_kinds, soft-capping, sandwich norms)

FAMILIES: dict[str, ModuleType] = {model_type: family for family in (marian, bart, t5, gpt2, llama, bert, m2m100, phi3,
                                                                   qwen2, qwen3, mistral, gemma, gemma2, gemma3)
                                   for model_type in family.MODEL_TYPES}  # fmt: skip


def family_of(hf: dict, source: str) -> ModuleType:
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise UserError(f"{source}: unknown architecture {model_type!r}; llmcli converts {', '.join(sorted(FAMILIES))}")
    family = FAMILIES[model_type]
    wanted = getattr(family, "ARCHITECTURES", None)
    found = hf.get("architectures") or []
    if wanted and found and not set(found) & set(wanted):
        raise UserError(f"{source}: {', '.join(found)} is not supported; for {model_type} llmcli converts {', '.join(wanted)}")
    return family


def is_hf_dir(path: Path) -> bool:
    """A Hugging Face model directory: a config.json naming a model_type (ours never does)."""
    try:
        hf = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(hf, dict) and "model_type" in hf


def convert_weights(src: str | Path) -> Transformer:
    """The model of a Hugging Face directory, without its tokenizer (float32, eval mode)."""
    return _convert_weights(Path(src))[0]


def _convert_weights(src: Path) -> tuple[Transformer, dict, ModuleType, dict]:
    """The model, and what was read on the way: their config, its family, their generation settings."""
    hf = read_hf_config(src)
    family = family_of(hf, str(src))
    gen = read_generation_config(src, hf)
    return _build(hf, family, read_weights(src), gen, str(src)), hf, family, gen


def _build(hf: dict, family: ModuleType, tensors: Mapping, gen: dict, source: str) -> Transformer:
    """`tensors`: a dict (GGUF's, already in memory) or `common.Shards` (read one at a time by apply_map)."""
    cfg = family.config(hf, tensors, gen)
    model = build_for_loading(cfg)
    ours = apply_map(tensors, family.weight_map(hf, cfg), model_tensors(model), source)
    del tensors
    load_state_into(model, ours, source)
    return model.eval()


def convert(src: str | Path) -> LoadedModel:
    """A Hugging Face model directory (or a GGUF file) as an llmcli model, in memory (float32, eval mode)."""
    src = Path(src)
    if is_gguf(src):
        return convert_parts(*gguf.read(src), src=src)
    model, hf, family, gen = _convert_weights(src)
    cfg = model.cfg
    if hasattr(family, "tokenizers"):
        tokenizer, source_tokenizer, tok_facts = family.tokenizers(src, hf, cfg)
    else:
        tokenizer, source_tokenizer, tok_facts = hf_tokenizer(src, {"pad": cfg.pad_id, "bos": cfg.bos_id, "eos": cfg.eos_id})
    chat = chat_settings(src, tokenizer.hf, gen, cfg) if cfg.architecture == "decoder-only" else {}
    return _assemble(model, hf, family, gen, (tokenizer, source_tokenizer, tok_facts), chat, src)


def convert_parts(hf: dict, tensors: dict, tokenizer, gen: dict, chat: dict | None = None, *, src: str | Path) -> LoadedModel:
    """A model given as the parts a Hugging Face directory holds, already read (a GGUF file's):
    their config.json as a dict, their tensors under their names, a tokenizers.Tokenizer whose
    post-processor adds what their tokenizer adds, their generation settings (special token ids),
    and the chat settings `common.chat_settings` would give (template, tokens, stop ids)."""
    src = Path(src)
    family = family_of(hf, str(src))
    model = _build(hf, family, tensors, gen, str(src))
    del tensors
    cfg = model.cfg
    names = special_names(tokenizer, {"pad": cfg.pad_id, "bos": cfg.bos_id, "eos": cfg.eos_id}, str(src))
    prefix, suffix = template(tokenizer)
    tok = Tokenizer.from_hf(tokenizer, **names, source=str(src))
    facts = {"special_tokens": names, "prefix": prefix, "suffix": suffix}
    return _assemble(model, hf, family, gen, (tok, tok, facts), chat or {}, src)


def _assemble(model: Transformer, hf: dict, family: ModuleType, gen: dict, toks: tuple, chat: dict, src: Path) -> LoadedModel:
    """Model, tokenizers and generation.json together."""
    cfg = model.cfg
    tokenizer, source_tokenizer, tok_facts = toks
    if tokenizer.vocab_size > cfg.output_vocab_size or source_tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"{src}: the tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.output_vocab_size}")
    generation = {"converted_from": {"model_type": hf["model_type"], "architectures": hf.get("architectures") or []},
                  "special_tokens": tok_facts["special_tokens"]}  # fmt: skip
    if getattr(family, "TASK", None):
        generation["task"] = family.TASK
    if cfg.architecture == "encoder-decoder":
        generation["source_prefix"] = tok_facts["prefix"]
        generation["source_suffix"] = tok_facts["suffix"]  # what the tokenizer adds, as transformers feeds it
    elif cfg.architecture == "decoder-only":
        generation["prompt_prefix"] = tok_facts["prefix"]
        generation["prompt_suffix"] = tok_facts["suffix"]
        generation.update(chat)
    if cfg.architecture != "encoder-only":
        generation.update(generation_settings(gen, cfg))
    generation.update(tok_facts.get("generation", {}))  # a family's own (M2M100's language tokens)
    return LoadedModel(model, tokenizer, source_tokenizer, generation, src)


def save(loaded: LoadedModel, out: str | Path) -> Path:
    return save_model(out, loaded.model, loaded.tokenizer, loaded.source_tokenizer, loaded.generation)


__all__ = ["FAMILIES", "VERSION", "convert", "convert_parts", "convert_weights", "family_of", "is_gguf", "is_hf_dir", "save"]
