"""`llmcli convert`: a Hugging Face checkpoint or a GGUF file to an llmcli model directory. Parse, call
`llmcli.convert`, report on stderr."""

from __future__ import annotations

from pathlib import Path

import typer

from llmcli.errors import UserError


def convert_command(
    src: str = typer.Argument(..., help="A Hugging Face model directory, model id (local cache; else downloaded) or GGUF file."),
    out: str = typer.Argument(..., help="The llmcli model directory to write (config.json, model.safetensors, tokenizer)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No log line on stderr."),
) -> None:
    """Convert a Hugging Face model (MarianMT, BART, mBART, T5, GPT-2, Llama, BERT for QA) or a GGUF file into an llmcli model.

    Every command's -m also takes the Hugging Face directory, id or GGUF file directly; convert writes a
    standalone copy. Weights are read from safetensors, or pytorch_model.bin loaded weights-only; a
    GGUF file (llama.cpp: Llama, Qwen2, Qwen3, Gemma) is dequantized to float32 (pip install 'llmcli[gguf]').

    Example: llmcli convert Helsinki-NLP/opus-mt-en-de opus-en-de && llmcli translate -m opus-en-de news.en
    """
    from llmcli.convert import convert, save
    from llmcli.hub import find_hf_model
    from llmcli.io import info, settings

    settings.quiet = quiet
    source = find_hf_model(src)
    if source is None:
        if Path(src).is_dir():
            raise UserError(f"{src}: not a Hugging Face model directory (no config.json with a model_type)")
        if Path(src).is_file():
            raise UserError(f"{src}: not a GGUF file (nor a model directory)")
        raise UserError(f"{src}: no such directory or model id")
    if Path(out).resolve() == source.resolve():
        raise UserError(f"{out}: the output would overwrite the source")
    loaded = convert(source)
    save(loaded, out)
    cfg = loaded.config
    info(f"converted {loaded.generation['converted_from']['model_type']} ({cfg.architecture}, "
         f"{loaded.model.num_parameters() / 1e6:.1f}M parameters) into {out}")  # fmt: skip
