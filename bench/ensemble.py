"""Translate with an ensemble: beam search over the mean of several models' probabilities.

What training several models buys instead of one, measured outside llmcli's commands (which
decode one model): each step feeds every model the same tokens, and the next token's score is the
log of the mean of their probabilities, as fairseq's and Marian's ensembles do. The models must
share their tokenizers (the same corpus and vocabulary size give the same BPE).

    python bench/ensemble.py -m runs/a -m runs/b ../shared/data/multi30k/test_2016_flickr.en -o hyp.de
    llmcli eval hyp.de --ref ../shared/data/multi30k/test_2016_flickr.de --metric bleu
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import torch

from llmcli.errors import UserError
from llmcli.tasks import DecodeSettings, open_model, seq2seq


class EnsembleCache:
    def __init__(self, caches: list) -> None:
        self.caches = caches

    def select(self, index: torch.Tensor) -> None:
        for cache in self.caches:
            cache.select(index)


class Ensemble:
    """The part of a Transformer that `llmcli.tasks.seq2seq` uses (encode, new_cache, step)."""

    def __init__(self, models: list) -> None:
        self.models, self.cfg, self.device = models, models[0].cfg, models[0].device

    def encode(self, src: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        return [m.encode(src, mask) for m in self.models]

    def new_cache(self, n: int, memories: list[torch.Tensor], mask: torch.Tensor) -> EnsembleCache:
        return EnsembleCache([m.new_cache(n, memory, mask) for m, memory in zip(self.models, memories)])

    def step(self, tokens: torch.Tensor, cache: EnsembleCache) -> torch.Tensor:
        log_probs = [torch.log_softmax(m.step(tokens, c).float(), -1) for m, c in zip(self.models, cache.caches)]
        return torch.logsumexp(torch.stack(log_probs), 0) - math.log(len(self.models))  # log of the mean probability


def open_ensemble(paths: list[str]):
    loaded = [open_model(p, "translate") for p in paths]
    first = Path(paths[0])
    for path, item in zip(paths, loaded):
        if item.config.architecture != "encoder-decoder" or item.config.vocab_size != loaded[0].config.vocab_size:
            sys.exit(f"ensemble.py: {path}: not an encoder-decoder of {first}'s vocabulary size")
        if (Path(path) / "tokenizer.json").read_bytes() != (first / "tokenizer.json").read_bytes():
            sys.exit(f"ensemble.py: {path}: its tokenizer differs from {first}'s; ensemble models of one vocabulary")
    return dataclasses.replace(loaded[0], model=Ensemble([item.model for item in loaded]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", action="append", required=True, help="an llmcli model directory; repeat it")
    parser.add_argument("source", help="one source sentence a line")
    parser.add_argument("-o", "--output", help="default: stdout")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--length-penalty", type=float, help="default: the first model's, as `llmcli translate`")
    args = parser.parse_args()
    try:
        ensemble = open_ensemble(args.model)
    except UserError as error:  # a missing or broken model: llmcli's one line, not a traceback
        sys.exit(f"ensemble.py: {error}")
    lines = Path(args.source).read_text(encoding="utf-8").splitlines()
    settings = DecodeSettings(beam_size=args.beam, length_penalty=args.length_penalty)
    with torch.inference_mode():
        text = "".join(out.text + "\n" for out in seq2seq(ensemble, lines, settings))
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
