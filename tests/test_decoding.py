"""Decoding: properties on toy steps, processors on hand-made logits, parity with HF `generate`."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmcli.decoding import (
    argmax,
    ban_repeated_ngrams,
    ban_tokens,
    beam_search,
    force_token,
    greedy_search,
    keep_top_k,
    keep_top_p,
    penalize_repetition,
    sample,
    topk,
)

INF = math.inf


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: a second intra-op thread only adds spin-waits (10 ms per op on a busy box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# A fake model: the cache is the token history; every step recomputes the last position from it.


class HistoryCache:
    def __init__(self, extra: dict[str, torch.Tensor] | None = None):
        self.history: torch.Tensor | None = None  # (N, T), -1 = left padding
        self.extra = extra or {}  # per-row tensors the step closes over (encoder output)
        self.selects: list[int] = []  # rows kept by each select, to check that finished rows leave

    def select(self, index: torch.Tensor) -> None:
        self.history = self.history.index_select(0, index)
        self.extra = {k: v.index_select(0, index) for k, v in self.extra.items()}
        self.selects.append(len(index))

    def append(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.history is None:
            self.history = tokens
        else:
            assert tokens.shape == (self.history.shape[0], 1), "step rows must follow the last select"
            self.history = torch.cat([self.history, tokens], dim=1)
        assert all(len(v) == len(self.history) for v in self.extra.values())
        return self.history


class ToyModel:
    """logits = W tanh(sum_i decay^(T-1-i) E[token_i] + pos[T]): depends on the whole history, in
    float64 so that a row's logits don't depend on which other rows share the batch."""

    def __init__(self, vocab: int, seed: int, scale: float = 2.0, dim: int = 8):
        g = torch.Generator().manual_seed(seed)
        self.E = torch.randn(vocab, dim, generator=g, dtype=torch.float64)
        self.pos = torch.randn(64, dim, generator=g, dtype=torch.float64)
        self.W = torch.randn(dim, vocab, generator=g, dtype=torch.float64) * scale
        self.calls = 0

    def __call__(self, tokens: torch.Tensor, cache: HistoryCache) -> torch.Tensor:
        self.calls += 1
        h = cache.append(tokens)
        real = h >= 0
        T = h.shape[1]
        decay = 0.7 ** torch.arange(T - 1, -1, -1, dtype=torch.float64)
        x = (self.E[h.clamp(min=0)] * (decay * real)[..., None]).sum(1) + self.pos[real.sum(1)]
        return (torch.tanh(x) @ self.W).float()


def left_pad(rows: list[list[int]]) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([[-1] * (width - len(r)) + r for r in rows])


def log_softmax_rows(logits):
    return torch.log_softmax(torch.tensor(logits, dtype=torch.float32), -1)


# Processors on hand-made logits.


def test_penalize_repetition_divides_positive_and_multiplies_negative_once():
    scores = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    history = torch.tensor([[-1, 0, 1, 0]])  # token 0 twice, padding ignored
    out = penalize_repetition(scores, history, 2.0)
    torch.testing.assert_close(out, torch.tensor([[1.0, -2.0, 0.5, 3.0]]))


def test_ban_repeated_ngrams():
    scores = torch.zeros(2, 5)
    history = torch.tensor([[1, 2, 3, 1, 2], [-1, -1, 4, 1, 2]])  # row 0: "1 2" was followed by 3
    out = ban_repeated_ngrams(scores, history, 3)
    assert out[0].tolist() == [0, 0, 0, -INF, 0]
    assert out[1].tolist() == [0] * 5
    bigram = ban_repeated_ngrams(scores, torch.tensor([[1, 2, 1, 3, 1], [-1, -1, -1, -1, 2]]), 2)
    assert bigram[0].tolist() == [0, 0, -INF, -INF, 0]
    assert bigram[1].tolist() == [0] * 5
    assert ban_repeated_ngrams(scores, torch.tensor([[1, 1], [1, 2]]), 3).equal(scores)


def test_ban_and_force_tokens():
    scores = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert ban_tokens(scores, [0, 2]).tolist() == [[-INF, 2.0, -INF], [-INF, 5.0, -INF]]
    assert ban_tokens(scores, [1], rows=torch.tensor([False, True])).tolist() == [[1, 2, 3], [4, -INF, 6]]
    assert force_token(scores, 1).tolist() == [[-INF, 0.0, -INF]] * 2
    assert force_token(scores, 2, rows=torch.tensor([True, False])).tolist() == [[-INF, -INF, 0.0], [4, 5, 6]]


def test_keep_top_k_and_top_p():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(keep_top_k(scores, 2)).tolist() == [[False, False, True, True]]
    assert keep_top_k(scores, 10).equal(scores)
    assert torch.isinf(keep_top_p(scores, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(keep_top_p(scores, 0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(keep_top_p(scores, 0.85)).tolist() == [[False, False, False, True]]
    assert torch.isinf(keep_top_p(scores, 0.9)).tolist() == [[False, False, False, True]]
    assert torch.isinf(keep_top_p(scores, 0.01)).tolist() == [[False, True, True, True]]


def test_processors_match_hf_on_random_logits():
    lp = pytest.importorskip("transformers.generation.logits_process")
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 30, generator=g) * 3
    history = torch.randint(0, 30, (6, 12), generator=g)
    history[:, 3:7] = torch.randint(0, 4, (6, 4), generator=g)  # make repeated n-grams likely
    for n in (1, 2, 3):
        torch.testing.assert_close(ban_repeated_ngrams(scores, history, n), lp.NoRepeatNGramLogitsProcessor(n)(history, scores))
    torch.testing.assert_close(
        penalize_repetition(scores, history, 1.7), lp.RepetitionPenaltyLogitsProcessor(1.7)(history, scores.clone())
    )
    for k in (1, 5, 40):
        torch.testing.assert_close(keep_top_k(scores, k), lp.TopKLogitsWarper(k)(history, scores))
    for p in (0.05, 0.5, 0.9, 0.99):
        torch.testing.assert_close(keep_top_p(scores, p), lp.TopPLogitsWarper(p)(history, scores))


# Properties on fixed tables and toy models.


def table_step(tables: list[list[list[float]]]):
    """Row r at generated position t gets tables[r][t], whatever it generated."""

    def step(tokens, cache):
        h = cache.append(tokens)
        rows = cache.extra["row"].tolist()
        t = h.shape[1] - 1
        return torch.tensor([tables[r][t] for r in rows])

    return step


def test_greedy_on_a_table_min_length_forced_and_suppressed_tokens():
    # eos = 0; row 0 would end at once, row 1 runs to max length
    table = [[5.0, 1.0, 0.0, 0.0]] * 4
    step = table_step([table, [[0.0, 1.0, 3.0, 2.0]] * 4])
    cache = HistoryCache({"row": torch.arange(2)})
    out = greedy_search(step, cache, torch.tensor([[3], [3]]), eos_id=0, max_new_tokens=3)
    assert [h.tokens for h in out] == [[], [2, 2, 2]]
    assert out[0].score == pytest.approx(log_softmax_rows(table[0])[0].item())
    assert cache.selects == [1]  # the row that ended left the batch

    step = table_step([table])
    out = greedy_search(
        step,
        HistoryCache({"row": torch.arange(1)}),
        torch.tensor([[3]]),
        eos_id=0,
        max_new_tokens=4,
        min_new_tokens=2,
        forced_tokens=[3],
        suppress_tokens=[1],
    )
    assert out[0].tokens == [3, 2]  # forced 3, eos banned then 1 suppressed, then eos
    assert out[0].score == pytest.approx(0.0 + math.log(1 / 2) + math.log(1 / (1 + 2 * math.exp(-5))))
    out = greedy_search(
        step,
        HistoryCache({"row": torch.arange(1)}),
        torch.tensor([[3]]),
        eos_id=0,
        max_new_tokens=3,
        min_new_tokens=5,
        forced_eos_id=0,
    )
    assert out[0].tokens == [1, 1]  # eos at max length


def all_sequences(step_model, start, vocab, eos_id, max_new, length_penalty=0.0):
    """Every finished sequence with its beam score, by brute force."""
    scored = []
    for n in range(1, max_new + 1):
        for seq in itertools.product(range(vocab), repeat=n):
            if eos_id in seq[:-1] or (n < max_new and seq[-1] != eos_id):
                continue
            cache = HistoryCache()
            logp = step_model(torch.tensor([start]), cache).log_softmax(-1)[0]
            total = 0.0
            for i, tok in enumerate(seq):
                total += logp[tok].item()
                if i + 1 < n:
                    logp = step_model(torch.tensor([[tok]]), cache).log_softmax(-1)[0]
            tokens = list(seq[:-1]) if seq[-1] == eos_id else list(seq)
            scored.append((total / n**length_penalty, tokens))
    return sorted(scored, key=lambda s: -s[0])


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_a_wide_beam_finds_the_exhaustive_best(length_penalty):
    vocab, eos, max_new = 5, 0, 4
    model = ToyModel(vocab, seed=3, scale=1.0)
    best = all_sequences(model, [2, 3], vocab, eos, max_new, length_penalty)[:3]
    out = beam_search(
        model,
        HistoryCache(),
        torch.tensor([[2, 3]]),
        beam_size=(vocab - 1) ** 3,
        eos_id=eos,
        max_new_tokens=max_new,
        length_penalty=length_penalty,
        n_best=3,
        early_stopping="never",
    )[0]
    assert [h.tokens for h in out] == [b[1] for b in best]
    assert [h.score for h in out] == pytest.approx([b[0] for b in best], abs=1e-5)


def test_beam_size_one_is_greedy():
    model = ToyModel(12, seed=0)
    start = left_pad([[3, 4, 5], [6], [7, 8]])
    kwargs = dict(eos_id=0, max_new_tokens=[9, 5, 7], min_new_tokens=[0, 2, 0], no_repeat_ngram_size=2)
    greedy = greedy_search(model, HistoryCache(), start, **kwargs)
    beam = beam_search(model, HistoryCache(), start, beam_size=1, length_penalty=0.0, **kwargs)
    assert [h.tokens for h in greedy] == [b[0].tokens for b in beam]


@pytest.mark.parametrize("search", ["greedy", "beam", "sample"])
def test_batch_equals_one_by_one(search):
    model = ToyModel(9, seed=1)
    rows = [[1, 2, 3, 4], [5], [6, 7], [8, 8, 8], [2], [3, 4, 5, 6, 7, 8]]
    max_new = [10, 3, 12, 6, 12, 8]
    min_new = [0, 0, 4, 0, 1, 0]

    def run(start, mx, mn, seed=0):
        kwargs = dict(eos_id=0, max_new_tokens=mx, min_new_tokens=mn, repetition_penalty=1.2)
        if search == "greedy":
            return greedy_search(model, HistoryCache(), start, **kwargs)
        if search == "beam":
            return beam_search(model, HistoryCache(), start, beam_size=3, n_best=2, length_penalty=0.8, **kwargs)
        # top-k 1 is deterministic, so sampling must also be batch-independent
        return sample(model, HistoryCache(), start, top_k=1, generator=torch.Generator().manual_seed(seed), **kwargs)

    batched = run(left_pad(rows), max_new, min_new)
    alone = [run(torch.tensor([r]), [mx], [mn])[0] for r, mx, mn in zip(rows, max_new, min_new)]
    assert [_tokens(b) for b in batched] == [_tokens(a) for a in alone]
    assert len({len(_tokens(b)[0] if search == "beam" else _tokens(b)) for b in batched}) > 2
    assert _scores(batched) == pytest.approx(_scores(alone), abs=1e-5)


def _tokens(out):
    return [h.tokens for h in out] if isinstance(out, list) else out.tokens


def _scores(outs):
    return [h.score for o in outs for h in (o if isinstance(o, list) else [o])]


def test_top_k_one_sampling_is_greedy_and_seeds_reproduce():
    model = ToyModel(20, seed=2, scale=0.5)
    start = left_pad([[1, 2], [3], [4, 5, 6]] * 4)
    kwargs = dict(eos_id=0, max_new_tokens=15)
    greedy = greedy_search(model, HistoryCache(), start, **kwargs)
    top1 = sample(model, HistoryCache(), start, top_k=1, temperature=0.7, **kwargs)
    assert [h.tokens for h in top1] == [h.tokens for h in greedy]

    def draw(seed, **extra):
        g = torch.Generator().manual_seed(seed)
        return [h.tokens for h in sample(model, HistoryCache(), start, generator=g, **kwargs, **extra)]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)
    assert draw(1, top_p=0.8, temperature=1.3) == draw(1, top_p=0.8, temperature=1.3)


def test_on_tokens_streams_original_rows():
    model = ToyModel(9, seed=1)
    start = left_pad([[1, 2, 3, 4], [5], [6, 7]])
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}

    def on_tokens(rows, tokens):
        for r, tok in zip(rows, tokens):
            seen[r].append(tok)

    out = greedy_search(model, HistoryCache(), start, eos_id=0, max_new_tokens=[10, 2, 6], on_tokens=on_tokens)
    for r, h in enumerate(out):
        assert seen[r] in (h.tokens, h.tokens + [0])


def test_bad_arguments():
    model = ToyModel(5, seed=0)
    start = torch.tensor([[1]])
    with pytest.raises(ValueError, match="n_best"):
        beam_search(model, HistoryCache(), start, beam_size=2, n_best=3, eos_id=0, max_new_tokens=3)
    with pytest.raises(ValueError, match="rows"):
        greedy_search(model, HistoryCache(), start, eos_id=0, max_new_tokens=[3, 4])
    with pytest.raises(ValueError, match=">= 1"):
        beam_search(model, HistoryCache(), start, beam_size=2, eos_id=0, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        sample(model, HistoryCache(), start, eos_id=0, max_new_tokens=3, temperature=0.0)
    assert greedy_search(model, HistoryCache(), torch.zeros(0, 1, dtype=torch.long), eos_id=0, max_new_tokens=3) == []


# Parity with Hugging Face `generate` on tiny random models.

transformers = pytest.importorskip("transformers")
VOCAB, EOS = 50, 18


def tiny_gpt2():
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=64,
        tie_word_embeddings=False,
        bos_token_id=EOS,
        eos_token_id=EOS,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # larger weights than the default init, for peaked, prompt-dependent outputs
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
        model.lm_head.weight.normal_(0, 0.6)
    return model


def gpt2_step(model):
    """Recompute the whole left-padded history each call, as HF does with a batch: the pad id
    (= eos) at masked positions and positions counted from the first real token."""

    @torch.no_grad()
    def step(tokens, cache):
        h = cache.append(tokens)
        mask = h >= 0
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return model(input_ids=h.masked_fill(~mask, EOS), attention_mask=mask.long(), position_ids=positions).logits[:, -1]

    return step


def prompts(n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        row = torch.randint(0, VOCAB - 1, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g)
        out.append((row + (row >= EOS).long()).tolist())  # no eos in prompts
    return out


def hf_generated(sequences: torch.Tensor, width: int, eos: int = EOS) -> list[list[int]]:
    out = []
    for row in sequences[:, width:].tolist():
        out.append(row[: row.index(eos)] if eos in row else row)
    return out


HF_SETTINGS = {
    "plain": {},
    "processors": dict(no_repeat_ngram_size=2, repetition_penalty=1.3, min_new_tokens=3),
    "suppress": dict(suppress_tokens=[35, 49], min_new_tokens=2),
}


@pytest.fixture(scope="module")
def gpt2():
    rows = prompts()
    start = left_pad(rows)
    return tiny_gpt2(), rows, start


def hf_generate(model, start, **settings):
    mask = (start >= 0).long()
    with torch.no_grad():
        return model.generate(
            input_ids=start.masked_fill(mask == 0, EOS),
            attention_mask=mask,
            pad_token_id=EOS,
            eos_token_id=EOS,
            max_new_tokens=12,
            return_dict_in_generate=True,
            output_scores=True,
            **{"do_sample": False} | settings,
        )


@pytest.mark.parametrize("name", list(HF_SETTINGS))
def test_greedy_matches_hf(gpt2, name):
    model, rows, start = gpt2
    settings = HF_SETTINGS[name]
    hf = hf_generate(model, start, **settings)
    cache = HistoryCache()
    ours = greedy_search(gpt2_step(model), cache, start, eos_id=EOS, max_new_tokens=12, **settings)
    assert [h.tokens for h in ours] == hf_generated(hf.sequences, start.shape[1])
    # HF's transition scores, normalised, summed over the tokens before the end
    steps = torch.stack(hf.scores, 1).log_softmax(-1)  # (B, steps, V)
    new = hf.sequences[:, start.shape[1] :]
    per_token = steps.gather(2, new[:, :, None]).squeeze(2)
    lengths = [min(len(h.tokens) + 1, 12) for h in ours]
    hf_scores = [per_token[i, :n].sum().item() for i, n in enumerate(lengths)]
    assert [h.score for h in ours] == pytest.approx(hf_scores, abs=1e-4)
    assert any(len(h.tokens) < 12 for h in ours) and any(len(h.tokens) == 12 for h in ours)
    assert len(cache.selects) > 1  # rows left as they ended


BEAM_SETTINGS = {
    "lp0.6": dict(length_penalty=0.6, early_stopping=False),
    "lp1.2-early": dict(length_penalty=1.2, early_stopping=True),
    "lp1.2-never-processors": dict(
        length_penalty=1.2, early_stopping="never", no_repeat_ngram_size=2, repetition_penalty=1.3, min_new_tokens=3
    ),
    "lp0.6-processors": dict(
        length_penalty=0.6, early_stopping=False, no_repeat_ngram_size=2, repetition_penalty=1.3, min_new_tokens=3
    ),
}


@pytest.mark.parametrize("name", list(BEAM_SETTINGS))
def test_beam_search_matches_hf(gpt2, name):
    model, rows, start = gpt2
    settings = BEAM_SETTINGS[name]
    hf = hf_generate(model, start, num_beams=4, num_return_sequences=2, **settings)
    cache = HistoryCache()
    ours = beam_search(gpt2_step(model), cache, start, beam_size=4, n_best=2, eos_id=EOS, max_new_tokens=12, **settings)
    flat = [h for row in ours for h in row]
    assert [h.tokens for h in flat] == hf_generated(hf.sequences, start.shape[1])
    assert [h.score for h in flat] == pytest.approx(hf.sequences_scores.tolist(), abs=1e-5)
    assert any(len(h.tokens) < 12 for h in flat)


@pytest.mark.parametrize("settings", [dict(temperature=0.8, top_k=10), dict(top_p=0.7, repetition_penalty=1.2)])
def test_sampling_matches_hf_while_no_row_ends(gpt2, settings):
    """HF draws one multinomial per step over the whole batch; so do we while no row has ended."""
    model, rows, start = gpt2
    torch.manual_seed(7)
    hf = hf_generate(model, start, min_new_tokens=12, **settings | dict(do_sample=True))
    torch.manual_seed(7)
    ours = sample(gpt2_step(model), HistoryCache(), start, eos_id=EOS, max_new_tokens=12, min_new_tokens=12, **settings)
    assert [h.tokens for h in ours] == hf_generated(hf.sequences, start.shape[1])


# Encoder-decoder: the step closes over the encoder output, kept in the cache so `select` follows it.
BART_EOS, BART_PAD, BART_BOS = 2, 1, 0


@pytest.fixture(scope="module")
def bart():
    cfg = transformers.BartConfig(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        pad_token_id=BART_PAD,
        bos_token_id=BART_BOS,
        eos_token_id=BART_EOS,
        decoder_start_token_id=BART_EOS,
    )
    torch.manual_seed(0)
    model = transformers.BartForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
        model.final_logits_bias[0, BART_EOS] = -2.0  # else it mostly stops at once
    g = torch.Generator().manual_seed(1)
    sources = [
        torch.randint(3, VOCAB, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist() + [BART_EOS]
        for _ in range(24)
    ]
    width = max(map(len, sources))
    source = torch.tensor([s + [BART_PAD] * (width - len(s)) for s in sources])  # right-padded, as HF pads
    return model, source, (source != BART_PAD).long()


def bart_step(model):
    @torch.no_grad()
    def step(tokens, cache):
        h = cache.append(tokens)
        out = model(encoder_outputs=(cache.extra["encoder"],), attention_mask=cache.extra["mask"], decoder_input_ids=h)
        return out.logits[:, -1]

    return step


def bart_cache(model, source, mask):
    with torch.no_grad():
        encoder = model.get_encoder()(input_ids=source, attention_mask=mask).last_hidden_state
    return HistoryCache({"encoder": encoder, "mask": mask})


@pytest.mark.parametrize(
    "beam",
    [None, dict(length_penalty=1.0), dict(length_penalty=0.6, no_repeat_ngram_size=2, repetition_penalty=1.3, min_new_tokens=4)],
)
def test_encoder_decoder_matches_hf(bart, beam):
    model, source, mask = bart
    settings = {k: v for k, v in (beam or {}).items() if k != "length_penalty"}
    forced = dict(forced_bos_token_id=BART_BOS, forced_eos_token_id=BART_EOS)
    with torch.no_grad():
        hf = model.generate(
            input_ids=source,
            attention_mask=mask,
            max_new_tokens=12,
            do_sample=False,
            num_beams=4 if beam else 1,
            num_return_sequences=2 if beam else 1,
            length_penalty=(beam or {}).get("length_penalty", 1.0),
            return_dict_in_generate=True,
            output_scores=True,
            **forced,
            **settings,
        )
    start = torch.full((len(source), 1), BART_EOS)
    ours_forced = dict(forced_tokens=[BART_BOS], forced_eos_id=BART_EOS)
    cache = bart_cache(model, source, mask)
    if beam:
        out = beam_search(
            bart_step(model), cache, start, beam_size=4, n_best=2, eos_id=BART_EOS, max_new_tokens=12, **beam, **ours_forced
        )
        flat = [h for row in out for h in row]
        assert [h.score for h in flat] == pytest.approx(hf.sequences_scores.tolist(), abs=1e-5)
    else:
        flat = greedy_search(bart_step(model), cache, start, eos_id=BART_EOS, max_new_tokens=12, **ours_forced)
    assert [h.tokens for h in flat] == hf_generated(hf.sequences, 1, BART_EOS)
    assert all(h.tokens[:1] == [BART_BOS] for h in flat)
    assert len({len(h.tokens) for h in flat}) > 2


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(1, 4),
    width=st.one_of(st.integers(1, 700), st.integers(4000, 30000)),
    k=st.integers(1, 12),
    levels=st.sampled_from([0, 3, 1000]),  # 0: continuous scores; else rounded to so many steps: ties
    n_inf=st.integers(0, 3),
    n_nan=st.sampled_from([0, 0, 0, 1]),
)
def test_blocked_argmax_and_topk_are_torchs(seed, rows, width, k, levels, n_inf, n_nan):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, width, generator=g)
    if levels:
        scores = (scores * levels).round() / levels
    for value, count in ((-INF, n_inf), (math.nan, n_nan)):
        for _ in range(count):
            scores[torch.randint(rows, (1,), generator=g), torch.randint(width, (1,), generator=g)] = value
    assert torch.equal(argmax(scores), scores.argmax(-1))
    k = min(k, width)
    values, indices = topk(scores, k)
    expected = scores.topk(k, -1)
    assert torch.equal(values.nan_to_num(nan=7.0), expected.values.nan_to_num(nan=7.0))
    assert torch.equal(indices, expected.indices)


def test_blocked_topk_and_argmax_find_the_best_in_the_tail_after_the_blocks():
    scores = torch.randn(3, 20_000)
    scores[1, 19_999] = 50.0  # in the tail after the last whole block
    scores[2, :10_000] = -INF
    values, indices = topk(scores, 8)
    assert torch.equal(indices, scores.topk(8, -1).indices) and indices[1, 0] == 19_999
    assert argmax(scores)[1] == 19_999
