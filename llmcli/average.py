"""Checkpoint averaging: the element-wise mean of the weights of several checkpoints of one run.

Averaging the last few checkpoints is a standard, free gain for translation (Vaswani et
al. 2017 averaged the last 5; fairseq's scripts/average_checkpoints.py). Sums are taken
in float64, so averaging copies of one checkpoint gives it back exactly.
"""

from __future__ import annotations

from pathlib import Path

from llmcli import checkpoint
from llmcli.config import ModelConfig
from llmcli.errors import UserError


def average_checkpoints(paths: list[str | Path], out: str | Path) -> Path:
    """Write to `out` a model directory whose weights are the mean of `paths`' (model
    directories with one config and tokenizer); the rest is copied from the first."""
    dirs = [Path(p) for p in paths]
    if not dirs:
        raise UserError("give the model directories to average, e.g. RUN/checkpoints/step-*")
    out = Path(out)
    if (out / "train_state").exists():
        raise UserError(f"{out} holds a training run; write the average to another --out")
    first = checkpoint.load_model(dirs[0])  # checks the directory, and gives tokenizers and generation settings
    tokenizer_bytes = (dirs[0] / checkpoint.TOKENIZER_FILE).read_bytes()
    for d in dirs:
        if not checkpoint.is_model_dir(d):
            raise UserError(f"{d}: not a model directory (config.json, model.safetensors)")
        if ModelConfig.load(d / checkpoint.CONFIG_FILE) != first.config:
            raise UserError(f"{d}: its config differs from {dirs[0]}'s; average checkpoints of one run")
        if (d / checkpoint.TOKENIZER_FILE).read_bytes() != tokenizer_bytes:
            raise UserError(f"{d}: its tokenizer differs from {dirs[0]}'s; average checkpoints of one run")
    mean = checkpoint.mean_weights([d / checkpoint.WEIGHTS_FILE for d in dirs])
    checkpoint.load_state_into(first.model, mean, f"{dirs[0]} and the others")
    return checkpoint.save_model(out, first.model, first.tokenizer, first.source_tokenizer, first.generation)
