"""Training examples, length-bucketed batches by token count, and collation.

The batch order of an epoch is a pure function of (lengths, batch_tokens, seed, epoch),
so a resumed run recomputes it and skips to where it stopped. A position in that order,
(epoch, index of the batch in the epoch), is the same whatever the number of processes:
each optimizer step takes the next `accumulate x processes` batches and every process
knows them all, working on its own share.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # label value that the loss skips (padding)


@dataclass(frozen=True)
class Example:
    src: list[int] | None  # None for decoder-only language modelling
    tgt: list[int]


@dataclass
class Batch:
    tokens: torch.Tensor  # (B, T) decoder input
    labels: torch.Tensor  # (B, T) next tokens, IGNORE_INDEX on padding
    src: torch.Tensor | None = None  # (B, S)
    src_mask: torch.Tensor | None = None  # (B, S) True for real tokens

    @property
    def n_target_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.tokens), move(self.labels), move(self.src), move(self.src_mask))


def seq2seq_example(src_ids: list[int], tgt_ids: list[int], *, start_id: int, eos_id: int, max_len: int) -> Example:
    """Source gets eos; the decoder reads [start] + target and predicts target + [eos]."""
    return Example(src=(src_ids[: max_len - 1] + [eos_id]), tgt=[start_id] + tgt_ids[: max_len - 1] + [eos_id])


def lm_examples(stream: list[int], block: int) -> list[Example]:
    """Cut a token stream into blocks of block+1 tokens (input and shifted labels), nanoGPT style."""
    if len(stream) < 2:
        return []
    if len(stream) <= block + 1:
        return [Example(None, stream)]
    return [Example(None, stream[i : i + block + 1]) for i in range(0, len(stream) - 1, block)]


def example_length(ex: Example) -> int:
    return max(len(ex.tgt), len(ex.src) if ex.src is not None else 0)


def make_batches(lengths: list[int], batch_tokens: int, seed: int, epoch: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, each holding at most `batch_tokens`
    padded tokens (at least one example), in a shuffled order that depends on seed and epoch."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)  # random tie-breaking inside a length
    order.sort(key=lambda i: lengths[i])
    batches, current, longest = [], [], 0
    for i in order:
        new_longest = max(longest, lengths[i])
        if current and new_longest * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, new_longest = [], lengths[i]
        current.append(i)
        longest = new_longest
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


def target_tokens(ex: Example) -> int:
    """Tokens the loss counts for this example (its labels after collation)."""
    return len(ex.tgt) - 1


class BatchStream:
    """Batches over endless epochs, addressed by position (epoch, index in the epoch)."""

    def __init__(self, lengths: list[int], batch_tokens: int, seed: int):
        self.lengths, self.batch_tokens, self.seed = lengths, batch_tokens, seed
        self._epoch, self._batches = -1, []

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, make_batches(self.lengths, self.batch_tokens, self.seed, epoch)
        return self._batches

    def take(self, epoch: int, index: int, n: int) -> tuple[list[tuple[int, int, list[int]]], int, int]:
        """The n batches from position (epoch, index) on, each with its position, and the
        position after them. Pure: the caller commits the new position when the step is done."""
        taken = []
        for _ in range(n):
            if index >= len(self.epoch_batches(epoch)):
                epoch, index = epoch + 1, 0
            taken.append((epoch, index, self.epoch_batches(epoch)[index]))
            index += 1
        return taken, epoch, index


def pad_rows(rows: list[list[int]], value: int, *, left: bool = False) -> torch.Tensor:
    """Token lists as one (B, T) tensor, padded with `value` on the right (or the left)."""
    width = max(len(r) for r in rows)
    return torch.tensor([[value] * (width - len(r)) + r if left else r + [value] * (width - len(r)) for r in rows],
                        dtype=torch.long)  # fmt: skip


def collate(examples: list[Example], pad_id: int) -> Batch:
    tokens = pad_rows([ex.tgt[:-1] for ex in examples], pad_id)
    labels = pad_rows([ex.tgt[1:] for ex in examples], IGNORE_INDEX)
    if examples[0].src is None:
        return Batch(tokens, labels)
    src = pad_rows([ex.src for ex in examples], pad_id)
    lengths = torch.tensor([len(ex.src) for ex in examples])
    src_mask = torch.arange(src.shape[1])[None, :] < lengths[:, None]
    return Batch(tokens, labels, src, src_mask)
