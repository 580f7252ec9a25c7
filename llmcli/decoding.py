"""Greedy search, beam search and sampling over `step(tokens, cache) -> logits`.

The model side provides two things (see model.py):
- `step(tokens (B, T), cache) -> logits (B, V)`: feeds T new tokens per row, appends them to the
  cache and returns the float logits of each row's last position. The first call gets the start
  tokens, left-padded with PAD_TOKEN (-1); later calls get one token per row. The logits are the decoder's
  from then on: it may change them in place, so a step returns a new tensor, not its own state.
- `cache.select(index)`: keeps batch rows `index` in that order, like `index_select(0, index)`.

Everything here matches Hugging Face `generate` token for token (transformers 5.x,
`GenerationMixin._sample` and `_beam_search`), including the odd parts; those are marked "HF:".
Finished rows leave the batch through `cache.select`, so long outputs don't pay for short ones.
Shapes: B rows (or items, for beam search), K beams, V vocabulary, P start width, T history.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from llmcli.cache import PAD_TOKEN

NEG = -1.0e9  # HF's "impossible" score for beams, kept so that ties and fallbacks break the same way


class Cache(Protocol):
    def select(self, index: Tensor) -> None: ...


Step = Callable[[Tensor, Cache], Tensor]
OnTokens = Callable[[list[int], list[int]], None]
PerRow = int | Sequence[int] | Tensor


@dataclass(frozen=True)
class Hypothesis:
    tokens: list[int]  # generated tokens, without the start tokens and without the final eos
    score: float  # beam: sum of log-probs / length ** length_penalty; greedy, sampling: sum of log-probs
    # (log-probs after the logits processors; see each search)


# torch's CPU argmax and topk over a vocabulary-long row are slow: on one thread 1.5 ms for the
# argmax of 32 x 32,000 scores and 9.6 ms for the top 8 of 32 x 128,000 (beam 4), where amax
# takes 0.2. Through the maxima of blocks of the row they take 0.27 and 1.2 (`python
# bench/reductions.py`; bench/README.md, "Argmax and top-k over the vocabulary"): the largest
# values lie in the blocks with the largest maxima. A GPU keeps its own kernels.
REDUCE_BLOCK = 128


def argmax(scores: Tensor) -> Tensor:
    """scores.argmax(-1) of (N, V) scores, the same index: the first of equal maxima, as torch's."""
    n, V = scores.shape
    n_blocks = V // REDUCE_BLOCK
    if scores.device.type != "cpu" or n_blocks < 2:
        return scores.argmax(-1)
    whole = n_blocks * REDUCE_BLOCK
    blocks = scores[:, :whole].unflatten(1, (n_blocks, REDUCE_BLOCK))  # a view
    block_max = blocks.amax(-1)  # (N, blocks); NaN where the block has one, as argmax takes NaN for the largest
    block = block_max.argmax(-1, keepdim=True)  # the first block that holds the maximum
    within = blocks.gather(1, block[:, :, None].expand(n, 1, REDUCE_BLOCK)).squeeze(1).argmax(-1, keepdim=True)
    index = (block * REDUCE_BLOCK + within).squeeze(1)
    if whole < V:  # the tail after the last whole block wins only above everything before it
        tail_max, tail_index = scores[:, whole:].max(-1)
        before = block_max.gather(1, block).squeeze(1)
        wins = (tail_max > before) | (tail_max.isnan() & ~before.isnan())
        index = torch.where(wins, tail_index + whole, index)
    return index


def topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """scores.topk(k, -1) of (N, V) scores: the same values and indices, best first. Where two of
    the k + 1 best are equal (or not numbers), torch's own, whose order among equals is its own."""
    n, V = scores.shape
    n_blocks = V // REDUCE_BLOCK
    if scores.device.type != "cpu" or n_blocks < 16 * (k + 1):  # few blocks a candidate: little to skip
        return tuple(scores.topk(k, -1))
    whole = n_blocks * REDUCE_BLOCK
    blocks = scores[:, :whole].unflatten(1, (n_blocks, REDUCE_BLOCK))
    # The k + 1 best values lie in the k + 1 blocks with the largest maxima (and the tail).
    chosen = blocks.amax(-1).topk(k + 1, -1).indices  # (N, k + 1)
    candidates = blocks.gather(1, chosen[:, :, None].expand(n, k + 1, REDUCE_BLOCK)).flatten(1)
    positions = (chosen[:, :, None] * REDUCE_BLOCK + torch.arange(REDUCE_BLOCK)).flatten(1)
    if whole < V:
        candidates = torch.cat([candidates, scores[:, whole:]], 1)
        positions = torch.cat([positions, torch.arange(whole, V).expand(n, V - whole)], 1)
    values, at = candidates.topk(k + 1, -1)
    if not bool((values[:, 1:] < values[:, :-1]).all()):  # a tie (-inf ones too) or a NaN among them
        return tuple(scores.topk(k, -1))
    return values[:, :k], positions.gather(1, at[:, :k])


# Logits processors: pure functions on (N, V) scores; `history` (N, T) is start + generated tokens.


def penalize_repetition(scores: Tensor, history: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty (Keskar et al. 2019) as HF applies it: each token in the history once,
    scores below zero multiplied by `penalty`, others divided. Padding (-1) is ignored."""
    V = scores.shape[-1]
    ids = history.masked_fill(history < 0, V)  # pads go to a spare column, dropped below
    padded = F.pad(scores, (0, 1))  # (N, V + 1)
    seen = padded.gather(1, ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return padded.scatter(1, ids, seen)[:, :V]


def ban_repeated_ngrams(scores: Tensor, history: Tensor, n: int) -> Tensor:
    """Ban every token that would complete an n-gram already in the history (HF's vectorised
    NoRepeatNGramLogitsProcessor). Windows holding padding never match a real suffix."""
    T = history.shape[1]
    if T < n:
        return scores
    V = scores.shape[-1]
    suffix = history[:, T + 1 - n :]  # (N, n-1)
    windows = history.unfold(1, n, 1)  # (N, T-n+1, n)
    matches = (windows[..., :-1] == suffix[:, None]).all(-1)
    banned = torch.zeros(scores.shape[0], V + 1, dtype=torch.bool, device=scores.device)
    banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(0, V), V), True)
    return scores.masked_fill(banned[:, :V], -math.inf)


def ban_tokens(scores: Tensor, token_ids: Sequence[int], rows: Tensor | None = None) -> Tensor:
    """Set `token_ids` to -inf, in all rows or where `rows` (N,) is true."""
    ids = torch.as_tensor(token_ids, dtype=torch.long, device=scores.device)
    if rows is None:
        return scores.index_fill(1, ids, -math.inf)  # a column fill, much cheaper than a (N, V) mask
    out = scores.clone()
    out[:, ids] = out[:, ids].masked_fill(rows[:, None], -math.inf)
    return out


def force_token(scores: Tensor, token_id: int, rows: Tensor | None = None) -> Tensor:
    """HF's forcing: every score -inf but `token_id`'s, which becomes 0 (log-prob 1)."""
    is_token = torch.arange(scores.shape[-1], device=scores.device) == token_id
    forced = torch.where(is_token, 0.0, -math.inf).to(scores.dtype).expand_as(scores)
    return forced.clone() if rows is None else torch.where(rows[:, None], forced, scores)


def keep_top_k(scores: Tensor, k: int) -> Tensor:
    """Keep the k best scores (and ties with the k-th), the rest -inf."""
    kth = topk(scores, min(k, scores.shape[-1]))[0][:, -1:]
    return scores.masked_fill(scores < kth, -math.inf)


def keep_top_p(scores: Tensor, p: float, min_keep: int = 1) -> Tensor:
    """Nucleus filtering (Holtzman et al. 2019) as HF does it: drop the tokens whose cumulative
    probability, summed from the least likely up, stays <= 1 - p."""
    sorted_scores, order = scores.sort(dim=-1)  # ascending
    drop = sorted_scores.softmax(-1).cumsum(-1) <= 1 - p
    drop[:, -min_keep:] = False
    return scores.masked_fill(drop.scatter(1, order, drop), -math.inf)


@dataclass(frozen=True)
class _Rules:
    """The processors HF's generate adds, applied in its order (`_get_logits_processor`).

    HF: the repetition penalty and the n-gram ban read the start tokens too (a decoder-only prompt,
    or an encoder-decoder's start token); forcing gives the forced token a log-prob of 0; a token
    both forced and suppressed leaves nothing (don't). HF's `bad_words_ids` of single tokens are
    `suppress_tokens` here, except that HF silently drops the eos id from them.
    """

    eos_id: int
    repetition_penalty: float
    no_repeat_ngram_size: int
    forced_tokens: tuple[int, ...]
    forced_eos_id: int | None
    suppress_tokens: tuple[int, ...]
    ban_eos_until: int  # max of min_new_tokens over rows; these bounds spare a sync per step
    force_eos_from: int  # min of max_new_tokens over rows, minus 1
    stop_ids: tuple[int, ...] = ()  # more ids that end a row as eos_id does

    @property
    def reads_history(self) -> bool:
        return self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0

    def __call__(self, scores: Tensor, history: Tensor | None, t: int, min_new: Tensor, max_new: Tensor) -> Tensor:
        """scores (N, V) for generated position t (0-based); min_new, max_new (N,) per row.
        `scores` is the caller's fresh tensor and may be changed in place: a copy of (N, V)
        every step would cost more than the ban it carries."""
        if self.repetition_penalty != 1.0:
            scores = penalize_repetition(scores, history, self.repetition_penalty)
        if self.no_repeat_ngram_size > 0:
            scores = ban_repeated_ngrams(scores, history, self.no_repeat_ngram_size)
        if t < self.ban_eos_until:
            if self.stop_ids:  # HF bans every one of a list of eos ids
                ends = [self.eos_id, *self.stop_ids]
                scores[:, ends] = scores[:, ends].masked_fill((t < min_new)[:, None], -math.inf)
            else:
                scores[:, self.eos_id].masked_fill_(t < min_new, -math.inf)  # = ban_tokens(scores, [eos], rows=...)
        if t < len(self.forced_tokens):
            scores = force_token(scores, self.forced_tokens[t])
        if self.forced_eos_id is not None and t >= self.force_eos_from:
            scores = force_token(scores, self.forced_eos_id, rows=t + 1 == max_new)
        if self.suppress_tokens:
            scores.index_fill_(1, torch.as_tensor(self.suppress_tokens, device=scores.device), -math.inf)  # = ban_tokens
        return scores


def _rules(
    eos_id: int,
    repetition_penalty: float,
    no_repeat_ngram_size: int,
    suppress_tokens: Sequence[int],
    forced_tokens: Sequence[int],
    forced_eos_id: int | None,
    min_new: Tensor,
    max_new: Tensor,
    stop_ids: Sequence[int] = (),
) -> _Rules:
    return _Rules(
        eos_id,
        repetition_penalty,
        no_repeat_ngram_size,
        tuple(forced_tokens),
        forced_eos_id,
        tuple(suppress_tokens),
        ban_eos_until=int(min_new.max()),
        force_eos_from=int(max_new.min()) - 1,
        stop_ids=tuple(i for i in stop_ids if i != eos_id),
    )


def _per_row(value: PerRow, n: int, device: torch.device, name: str) -> Tensor:
    rows = torch.as_tensor(value, dtype=torch.long, device=device)
    rows = rows.expand(n).clone() if rows.dim() == 0 else rows
    if rows.shape != (n,):
        raise ValueError(f"{name} has {rows.numel()} values for {n} rows")
    return rows


def _strip_eos(tokens: list[int], eos_id: int, stop_ids: Sequence[int] = ()) -> list[int]:
    return tokens[:-1] if tokens and (tokens[-1] == eos_id or tokens[-1] in stop_ids) else tokens


def _decode(step, cache, start_tokens, pick, max_new_tokens, min_new_tokens, on_tokens, rule_options: tuple,
            stop_ids: Sequence[int] = ()):  # fmt: skip
    """One token per row per step; `pick(scores (B, V)) -> (tokens (B,), log-probs (B,))`."""
    B, P = start_tokens.shape
    device = start_tokens.device
    max_new = _per_row(max_new_tokens, B, device, "max_new_tokens")
    min_new = _per_row(min_new_tokens, B, device, "min_new_tokens")
    if B == 0:
        return []
    if int(max_new.min()) < 1:
        raise ValueError("max_new_tokens must be >= 1")
    rules = _rules(*rule_options, min_new, max_new, stop_ids)
    ends = torch.tensor((rules.eos_id, *rules.stop_ids), device=device)
    rows = list(range(B))  # original index of each live row
    history = start_tokens  # (B, P + t)
    scores = torch.zeros(B, device=device)
    results: list[Hypothesis | None] = [None] * B
    tokens = start_tokens
    for t in range(int(max_new.max())):
        logits = rules(step(tokens, cache).float(), history, t, min_new, max_new)  # (B, V)
        new, log_prob = pick(logits)  # (B,), (B,)
        scores = scores + log_prob
        history = torch.cat([history, new[:, None]], dim=1)
        if on_tokens is not None:
            on_tokens(rows, new.tolist())
        done = torch.isin(new, ends) | (t + 1 >= max_new)
        if done.any():
            gone = done.nonzero().squeeze(1)
            for i, toks, score in zip(gone.tolist(), history[gone, P:].tolist(), scores[gone].tolist()):
                results[rows[i]] = Hypothesis(_strip_eos(toks, rules.eos_id, rules.stop_ids), score)
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            cache.select(keep)
            history, scores, min_new, max_new = (x.index_select(0, keep) for x in (history, scores, min_new, max_new))
            rows = [rows[i] for i in keep.tolist()]
        tokens = history[:, -1:]
    return results


@torch.inference_mode()  # no gradients; and a step run in inference mode gives logits changeable only in it
def greedy_search(
    step: Step,
    cache: Cache,
    start_tokens: Tensor,
    *,
    eos_id: int,
    max_new_tokens: PerRow,
    min_new_tokens: PerRow = 0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    suppress_tokens: Sequence[int] = (),
    forced_tokens: Sequence[int] = (),
    forced_eos_id: int | None = None,
    on_tokens: OnTokens | None = None,
    stop_ids: Sequence[int] = (),
) -> list[Hypothesis]:
    """HF `generate(do_sample=False, num_beams=1)`. The score sums the log-softmax of the processed
    logits at the chosen tokens (HF's `compute_transition_scores(normalize_logits=True)`).
    `stop_ids` end a row as `eos_id` does (HF's `eos_token_id` as a list: end-of-turn tokens)."""

    def pick(logits: Tensor) -> tuple[Tensor, Tensor]:
        new = argmax(logits)
        return new, torch.log_softmax(logits, -1, out=logits).gather(1, new[:, None]).squeeze(1)  # in place: see _Rules

    rule_options = (eos_id, repetition_penalty, no_repeat_ngram_size, suppress_tokens, forced_tokens, forced_eos_id)
    return _decode(step, cache, start_tokens, pick, max_new_tokens, min_new_tokens, on_tokens, rule_options, stop_ids)


@torch.inference_mode()  # no gradients; and a step run in inference mode gives logits changeable only in it
def sample(
    step: Step,
    cache: Cache,
    start_tokens: Tensor,
    *,
    eos_id: int,
    max_new_tokens: PerRow,
    min_new_tokens: PerRow = 0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    suppress_tokens: Sequence[int] = (),
    forced_tokens: Sequence[int] = (),
    forced_eos_id: int | None = None,
    on_tokens: OnTokens | None = None,
    stop_ids: Sequence[int] = (),
) -> list[Hypothesis]:
    """HF `generate(do_sample=True, num_beams=1)`: processors, then temperature, top-k, top-p, then
    one multinomial draw per live row. The score sums the log-probs of the distribution drawn from.
    Draws depend on the seed and on which rows are still live, as in HF. `stop_ids`: as in greedy_search."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 (use greedy_search)")

    def pick(logits: Tensor) -> tuple[Tensor, Tensor]:
        if temperature != 1.0:
            logits = logits / temperature
        if top_k:
            logits = keep_top_k(logits, top_k)
        if top_p is not None and top_p < 1.0:
            logits = keep_top_p(logits, top_p)
        new = torch.multinomial(logits.softmax(-1), 1, generator=generator)  # (B, 1)
        return new.squeeze(1), logits.log_softmax(-1).gather(1, new).squeeze(1)

    rule_options = (eos_id, repetition_penalty, no_repeat_ngram_size, suppress_tokens, forced_tokens, forced_eos_id)
    return _decode(step, cache, start_tokens, pick, max_new_tokens, min_new_tokens, on_tokens, rule_options, stop_ids)


@torch.inference_mode()  # no gradients; and a step run in inference mode gives logits changeable only in it
def beam_search(
    step: Step,
    cache: Cache,
    start_tokens: Tensor,
    *,
    beam_size: int,
    eos_id: int,
    max_new_tokens: PerRow,
    min_new_tokens: PerRow = 0,
    length_penalty: float = 1.0,
    n_best: int = 1,
    early_stopping: bool | Literal["never"] = False,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    suppress_tokens: Sequence[int] = (),
    forced_tokens: Sequence[int] = (),
    forced_eos_id: int | None = None,
    stop_ids: Sequence[int] = (),
) -> list[list[Hypothesis]]:
    """HF `generate(num_beams=beam_size, num_return_sequences=n_best, do_sample=False)`; returns the
    n_best hypotheses of each row, best first, scored like HF's `sequences_scores`.

    HF: processors act on log-probs, not logits, and nothing renormalises after them (banning
    tokens leaves the others' log-probs as they were; the repetition penalty multiplies log-probs). A finished hypothesis scores
    sum_logprobs / n ** length_penalty, n = generated tokens including eos, excluding the start.
    Each step keeps the 2K best candidates; those among the first K that end (eos or max length)
    become finished, and the best K that don't end are the next beams. A row stops when its K
    finished ones can't be beaten: early_stopping=True, as soon as K are finished; False, when the
    best live beam divided by its *current* length can't beat the worst finished (a heuristic that
    can stop too early when length_penalty > 0); "never", the same with the max length when
    length_penalty > 0, which is exact. beam_size=1 runs this algorithm, unlike HF (greedy); it
    differs from greedy_search only with a repetition penalty (log-probs vs logits). `stop_ids`:
    as in greedy_search.
    """
    B = start_tokens.shape[0]
    K = beam_size
    device = start_tokens.device
    if not 1 <= n_best <= K:
        raise ValueError(f"n_best={n_best} must be between 1 and beam_size={K}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping={early_stopping!r} must be True, False or 'never'")
    max_new = _per_row(max_new_tokens, B, device, "max_new_tokens")
    min_new = _per_row(min_new_tokens, B, device, "min_new_tokens")
    if B == 0:
        return []
    if int(max_new.min()) < 1:
        raise ValueError("max_new_tokens must be >= 1")
    rules = _rules(
        eos_id,
        repetition_penalty,
        no_repeat_ngram_size,
        suppress_tokens,
        forced_tokens,
        forced_eos_id,
        min_new,
        max_new,
        stop_ids,
    )
    end_ids = torch.tensor((eos_id, *rules.stop_ids), device=device)  # any of them ends a hypothesis (HF: a list of eos)
    L = int(max_new.max())
    # HF divides by a Python float, i.e. float64 rounded to float32 (no float64 on some devices)
    max_new_penalty = (max_new.cpu().double() ** length_penalty).float().to(device)  # (B,)

    # Live beams: generated tokens (B, K, L), summed log-probs (B, K). Beams 1..K-1 start
    # impossible so that the first step expands beam 0 only (HF).
    prompt = start_tokens  # (B, P)
    seqs = torch.full((B, K, L), PAD_TOKEN, dtype=torch.long, device=device)
    live_scores = torch.full((B, K), NEG, device=device)
    live_scores[:, 0] = 0.0
    # Finished: best K so far, with penalised scores; placeholders score NEG and are not `fin_done`.
    fin_seqs = seqs.clone()
    fin_scores = torch.full((B, K), NEG, device=device)
    fin_done = torch.zeros(B, K, dtype=torch.bool, device=device)
    fin_len = torch.zeros(B, K, dtype=torch.long, device=device)
    among_first_k = torch.arange(2 * K, device=device) < K  # (2K,)

    items = list(range(B))  # original index of each live row
    results: list[list[Hypothesis] | None] = [None] * B
    tokens = start_tokens
    for t in range(L):
        n = len(items)
        logits = step(tokens, cache).float().contiguous()
        log_probs = torch.log_softmax(logits, -1, out=logits)  # (n * K, V); (n, V) at t = 0. In place: see _Rules
        if t == 0:
            log_probs = log_probs.repeat_interleave(K, dim=0)
        history = None  # (n * K, P + t), built only for the processors that read it
        if rules.reads_history:
            history = torch.cat([prompt.repeat_interleave(K, dim=0), seqs[:, :, :t].reshape(n * K, t)], dim=1)
        log_probs = rules(log_probs, history, t, min_new.repeat_interleave(K), max_new.repeat_interleave(K))
        V = log_probs.shape[-1]
        totals = log_probs.view(n, K, V).add_(live_scores[:, :, None]).reshape(n, K * V)
        cand_scores, cand_index = topk(totals, 2 * K)  # (n, 2K), best first
        cand_beam, cand_token = cand_index // V, cand_index % V
        cand_seqs = seqs.take_along_dim(cand_beam[:, :, None], dim=1)  # (n, 2K, L)
        cand_seqs[:, :, t] = cand_token
        ends = torch.isin(cand_token, end_ids) | (t + 1 >= max_new[:, None])  # (n, 2K)

        # Next live beams: the K best candidates that don't end.
        go_on = cand_scores + ends.float() * NEG
        best = go_on.topk(K, dim=-1).indices  # (n, K)
        seqs = cand_seqs.take_along_dim(best[:, :, None], dim=1)
        live_scores = go_on.gather(1, best)
        parent = cand_beam.gather(1, best)  # (n, K)

        # Finished: merge the candidates that end among the first K into the best K.
        finished_now = ends & among_first_k
        penalised = cand_scores / ((t + 1) ** length_penalty) + (~finished_now).float() * NEG
        merged = torch.cat([fin_scores, penalised], dim=1).topk(K, dim=-1).indices  # (n, K) of 2K + K
        fin_scores = torch.cat([fin_scores, penalised], dim=1).gather(1, merged)
        fin_seqs = torch.cat([fin_seqs, cand_seqs], dim=1).take_along_dim(merged[:, :, None], dim=1)
        fin_done = torch.cat([fin_done, finished_now], dim=1).gather(1, merged)
        fin_len = torch.cat([fin_len, torch.full_like(cand_token, t + 1)], dim=1).gather(1, merged)

        # Rows whose finished hypotheses can no longer change (HF's `_check_early_stop_heuristic`).
        if early_stopping == "never" and length_penalty > 0.0:
            best_length = max_new_penalty[:, None]  # (n, 1)
        else:
            best_length = float(t + 1) ** length_penalty
        best_possible = live_scores[:, :1] / best_length  # (n, 1)
        worst_finished = torch.where(fin_done, fin_scores.min(dim=1, keepdim=True).values, NEG)
        done = ~(best_possible > worst_finished).any(dim=1) | (t + 1 >= max_new)
        if early_stopping is True:
            done |= fin_done.all(dim=1)

        keep = torch.arange(n, device=device)
        if done.any():
            gone = done.nonzero().squeeze(1)
            lengths = fin_len[gone, :n_best].tolist()
            scores = fin_scores[gone, :n_best].tolist()
            seqs_gone = fin_seqs[gone, :n_best].tolist()
            for j, i in enumerate(gone.tolist()):
                results[items[i]] = [
                    Hypothesis(_strip_eos(s[:m], eos_id, rules.stop_ids), sc)
                    for s, m, sc in zip(seqs_gone[j], lengths[j], scores[j])
                ]
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            state = (
                prompt,
                seqs,
                live_scores,
                parent,
                fin_seqs,
                fin_scores,
                fin_done,
                fin_len,
                min_new,
                max_new,
                max_new_penalty,
            )
            (prompt, seqs, live_scores, parent, fin_seqs, fin_scores, fin_done, fin_len, min_new, max_new, max_new_penalty) = (
                x.index_select(0, keep) for x in state
            )
            items = [items[i] for i in keep.tolist()]
        # One select drops finished rows, reorders beams and, after the first step, expands to K.
        index = keep[:, None] * K + parent if t > 0 else keep[:, None].expand(-1, K)  # (n, K)
        cache.select(index.flatten())
        tokens = seqs[:, :, t].reshape(-1, 1)
    return results
