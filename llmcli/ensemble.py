"""Several encoder-decoder models decoded as one: each step's next-token distribution is the mean
of the members' probabilities, as fairseq's and Marian's ensembles decode.

An `Ensemble` offers what decoding uses of a Transformer (`encode`, `new_cache`, `step`), so every
decoding function (greedy, beam, sampling) runs it unchanged. Its members share one tokenizer;
`llmcli.tasks.open_model` checks that. Why: at the same training budget on a CPU, two models of one
core each translate Multi30k 0.9-1.4 BLEU better than one model of two cores (bench/README.md,
"Two models instead of one").
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llmcli.model import Transformer


class EnsembleCache:
    """One decoding cache per member; a beam reorder reorders all of them."""

    def __init__(self, caches: list) -> None:
        self.caches = caches

    def select(self, index: torch.Tensor) -> None:
        for cache in self.caches:
            cache.select(index)


class Ensemble(nn.Module):
    def __init__(self, members: list[Transformer]) -> None:
        super().__init__()
        if not members or any(m.cfg.architecture != "encoder-decoder" for m in members):
            raise ValueError("an ensemble is of one or more encoder-decoder models")
        self.members = nn.ModuleList(members)
        self.cfg = members[0].cfg  # ids, positions and vocabulary: the same in every member (checked on loading)

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    def num_parameters(self) -> int:
        return sum(m.num_parameters() for m in self.members)

    def encode(self, src: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        return [m.encode(src, mask) for m in self.members]

    def new_cache(self, n: int, memories: list[torch.Tensor], mask: torch.Tensor) -> EnsembleCache:
        return EnsembleCache([m.new_cache(n, memory, mask) for m, memory in zip(self.members, memories)])

    def step(self, tokens: torch.Tensor, cache: EnsembleCache) -> torch.Tensor:
        """Log-probabilities (fp32) of the next token: the log of the members' mean probability. Decoding
        takes a log-softmax of what a step returns; of log-probabilities that changes nothing."""
        if len(self.members) == 1:
            return self.members[0].step(tokens, cache.caches[0])
        log_probs = [torch.log_softmax(m.step(tokens, c).float(), -1) for m, c in zip(self.members, cache.caches)]
        return torch.logsumexp(torch.stack(log_probs), 0) - math.log(len(self.members))
