"""Per task: input format, prompt, decode settings, output.

Every task reads its input as a stream in chunks, sorts each chunk by length into
token-count batches, decodes, and yields results in input order: one result per input
line, empty in, empty out.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import string
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from llmcli import decoding, fast, hub, models
from llmcli.cache import PAD_TOKEN
from llmcli.checkpoint import LoadedModel, ensemble_members, load_model
from llmcli.data import IGNORE_INDEX, pad_rows
from llmcli.device import resolve_precision, reuse_freed_memory
from llmcli.ensemble import Ensemble
from llmcli.errors import UserError
from llmcli.io import warn
from llmcli.qa_data import qa_source

OnLong = Literal["truncate", "error", "skip"]
TASKS_BY_ARCHITECTURE = {
    "encoder-decoder": ("translate", "summarize", "qa"),
    "decoder-only": ("generate", "chat", "translate", "summarize", "qa"),  # the last three: instruct models
    "encoder-only": ("qa",),  # extractive: a span of the context (BERT)
}


@dataclass(frozen=True)
class DecodeSettings:
    """How to decode. None means not given: the model's own defaults (generation.json "decode")
    fill it, then the task's (TASK_DEFAULTS), then BASE_DEFAULTS; see `with_defaults`. Every
    value given is checked here, so library callers get the CLI's checks."""

    beam_size: int | None = None
    n_best: int | None = None
    length_penalty: float | None = None
    max_len: int | None = None  # most new tokens; None after defaults: a * source tokens + b (seq2seq)
    max_len_a: float | None = None
    max_len_b: int | None = None
    min_len: int | None = None
    no_repeat_ngram_size: int | None = None
    repetition_penalty: float | None = None
    sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None  # 0: all tokens
    top_p: float | None = None
    seed: int | None = None
    batch_tokens: int | None = None
    chunk_lines: int | None = None
    on_long: OnLong | None = None
    early_stopping: bool | str | None = None  # beam search: True, False or "never", as HF's generate

    def __post_init__(self) -> None:
        for name in ("beam_size", "n_best", "batch_tokens", "chunk_lines", "max_len"):
            _check(self, name, lambda v: v >= 1, "must be at least 1")
        for name in ("min_len", "no_repeat_ngram_size", "top_k", "max_len_b"):
            _check(self, name, lambda v: v >= 0, "must be at least 0")
        for name in ("temperature", "repetition_penalty"):
            _check(self, name, lambda v: v > 0, "must be above 0")
        _check(self, "top_p", lambda v: 0 < v <= 1, "must be in (0, 1]")
        _check(self, "on_long", lambda v: v in ("truncate", "error", "skip"), "is not truncate, error or skip")
        _check(self, "early_stopping", lambda v: v in (True, False, "never"), "is not true, false or never")
        if self.n_best is not None and self.n_best > (self.beam_size or 1) and not self.sample:
            raise UserError(f"{_flag('n_best')} {self.n_best} needs {_flag('beam_size')} of at least {self.n_best}")

    @property
    def given(self) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None)

    def filled(self, defaults: dict) -> DecodeSettings:
        """These settings, with `defaults` for the ones not given."""
        missing = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        return dataclasses.replace(self, **missing) if missing else self


# The option each field is given by on the command line, where its name differs.
_FLAGS = {"beam_size": "--beam", "no_repeat_ngram_size": "--no-repeat-ngram", "sample": "--greedy"}


def _flag(name: str) -> str:
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def _check(settings: DecodeSettings, name: str, ok: Callable[[object], bool], problem: str) -> None:
    value = getattr(settings, name)
    if value is not None and not ok(value):
        raise UserError(f"{_flag(name)} {value!r} {problem}")


BASE_DEFAULTS = dict(beam_size=1, n_best=1, length_penalty=1.0, max_len_a=2.0, max_len_b=10, min_len=0,
                     no_repeat_ngram_size=0, repetition_penalty=1.0, sample=False, temperature=1.0, top_k=0,
                     batch_tokens=4096, chunk_lines=2000, on_long="truncate", early_stopping=False)  # fmt: skip
_SAMPLING = dict(sample=True, temperature=0.8, top_k=50, top_p=0.95)
TASK_DEFAULTS = {
    "translate": dict(beam_size=4),
    "summarize": dict(beam_size=4, max_len=128, no_repeat_ngram_size=3, batch_tokens=8192),
    "qa": dict(beam_size=4, max_len=64),
    "generate": _SAMPLING,
    "chat": _SAMPLING,
}


def with_defaults(settings: DecodeSettings, loaded: LoadedModel, task: str | None = None) -> DecodeSettings:
    """Fill what the user did not give: the model's own decoding defaults (generation.json
    "decode": beam, length penalty, max length...), then the task's, then the base ones."""
    task_defaults = TASK_DEFAULTS[task] if task else {}
    model = {k: v for k, v in loaded.generation.get("decode", {}).items() if k in DecodeSettings.__dataclass_fields__}
    if settings.filled(task_defaults).sample:
        model.pop("beam_size", None)  # sampling draws one sequence
    return settings.filled(model).filled(task_defaults).filled(BASE_DEFAULTS)


@dataclass(frozen=True)
class Output:
    """One input line's result: its hypotheses, best first (one unless n-best)."""

    texts: list[str]
    scores: list[float]
    tokens: int = 0  # generated tokens of the best hypothesis (for tokens/s)

    @property
    def text(self) -> str:
        return self.texts[0] if self.texts else ""


EMPTY = Output([""], [0.0])


def open_model(
    path: str | list[str] | None, task: str | None = None, device: str = "cpu", precision: str = "fp32"
) -> LoadedModel:
    """What `-m` names (llmcli or Hugging Face directory, model id), loaded; for `task`, checked
    to run it and prepared for inference (llmcli.fast) at `precision` (fp32 bf16 int8 int4 auto).
    Several models, or an ensemble directory (checkpoint.ENSEMBLE_FILE), load as one `Ensemble`."""
    precision = resolve_precision(precision, torch.device(device))  # before loading: a bad name costs nothing
    given = [path] if path is None or isinstance(path, str) else list(path) or [None]
    specs = [models.model_for(task, spec) for spec in given]  # -m left out: $LLMCLI_MODEL, the stored default, the demo
    directories = []
    for spec in specs:
        directory = hub.resolve(spec)
        directories += ensemble_members(directory) or [directory]
    if len(directories) == 1:
        loaded = load_model(directories[0], device=device)
    else:
        loaded = _load_ensemble(directories, device, specs[0] if len(specs) == 1 else None)
    if task is None:
        return loaded
    allowed = TASKS_BY_ARCHITECTURE[loaded.config.architecture]
    if task not in allowed:
        raise UserError(
            f"{' + '.join(specs)} is {'an' if loaded.config.architecture[0] in 'aeiou' else 'a'} {loaded.config.architecture} model; it runs {', '.join(allowed)}, not {task}"
        )
    fast.prepare(loaded.model, precision)
    reuse_freed_memory()  # each decoding step makes and frees tensors of the same sizes
    return loaded


# What the members of an ensemble must share to decode as one: its ids, positions and vocabulary.
_ENSEMBLE_SHARED = ("vocab_size", "output_vocab_size", "max_positions", "pad_id", "bos_id", "eos_id", "start_id")


def _load_ensemble(directories: list, device: str, directory: str | None) -> LoadedModel:
    members = [load_model(d, device=device) for d in directories]
    first = members[0]
    for d, member in zip(directories, members):
        if member.config.architecture != "encoder-decoder":
            raise UserError(f"{d}: {member.config.architecture} models do not ensemble; an ensemble is of encoder-decoders")
        differs = [f for f in _ENSEMBLE_SHARED if getattr(member.config, f) != getattr(first.config, f)]
        differs += ["generation.json"] if member.generation != first.generation else []
        differs += [
            "tokenizer" for a, b in ((member.tokenizer, first.tokenizer), (member.source_tokenizer, first.source_tokenizer))
            if a.hf.to_str() != b.hf.to_str()
        ][:1]  # fmt: skip
        if differs:
            verb = "differs" if len(differs) == 1 else "differ"
            raise UserError(f"{d}: its {', '.join(differs)} {verb} from {directories[0]}'s; an ensemble's models share them")
    path = Path(directory) if directory is not None else None
    return dataclasses.replace(first, model=Ensemble([m.model for m in members]), path=path)


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _fit(ids: list[int], limit: int, line_number: int, on_long: OnLong) -> list[int] | None:
    """Apply the over-long policy; None means skip the line."""
    if len(ids) <= limit:
        return ids
    if on_long == "error":
        raise UserError(f"input line {line_number} has {len(ids)} tokens, more than the model's {limit}")
    if on_long == "skip":
        warn(f"input line {line_number} has {len(ids)} tokens, more than the model's {limit}: skipped (empty output)")
        return None
    warn(f"input line {line_number} has {len(ids)} tokens, more than the model's {limit}: truncated")
    return ids[:limit]


def _token_batches(lengths: list[int], batch_tokens: int, width: int) -> list[list[int]]:
    """Indices sorted by length, cut so that (longest * rows * width) stays under batch_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current = [], []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and longest * (len(current) + 1) * width > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def prompt_affixes(loaded: LoadedModel) -> tuple[list[int], list[int]]:
    """What the model's tokenizer puts around a prompt (Llama: <s>, GPT-2: nothing); ours: bos."""
    return loaded.generation.get("prompt_prefix", [loaded.config.bos_id]), loaded.generation.get("prompt_suffix", [])


def stop_ids_of(loaded: LoadedModel) -> tuple[int, ...]:
    """Every id that ends an output: generation.json's "stop_ids" (a converted model's list of
    end ids, as HF's generate stops at any), else the eos."""
    return tuple(loaded.generation.get("stop_ids") or [loaded.config.eos_id])


def _decode_batch(
    loaded: LoadedModel,
    step,
    cache,
    start: torch.Tensor,
    max_new,
    settings: DecodeSettings,
    suppress: tuple[int, ...],
    on_tokens=None,
) -> list[list[decoding.Hypothesis]]:
    cfg, gen = loaded.config, loaded.generation
    stop_ids = stop_ids_of(loaded)
    # A converted model's forced first and last tokens (BART's <s>, Marian's </s>), as HF's generate forces them
    forced = [gen["forced_bos_id"]] if gen.get("forced_bos_id") is not None else []
    rules = dict(eos_id=cfg.eos_id, max_new_tokens=max_new, min_new_tokens=settings.min_len,
                 repetition_penalty=settings.repetition_penalty, no_repeat_ngram_size=settings.no_repeat_ngram_size,
                 suppress_tokens=suppress, forced_tokens=forced, forced_eos_id=gen.get("forced_eos_id"))  # fmt: skip
    if settings.sample:
        generator = None
        if settings.seed is not None:
            generator = torch.Generator(device=start.device).manual_seed(settings.seed)
        hyps = decoding.sample(step, cache, start, temperature=settings.temperature, top_k=settings.top_k or None,
                               top_p=settings.top_p, generator=generator, on_tokens=on_tokens, stop_ids=stop_ids,
                               **rules)  # fmt: skip
        return [[h] for h in hyps]
    if settings.beam_size <= 1:
        return [[h] for h in decoding.greedy_search(step, cache, start, on_tokens=on_tokens, stop_ids=stop_ids, **rules)]
    return decoding.beam_search(step, cache, start, beam_size=settings.beam_size, n_best=settings.n_best,
                                length_penalty=settings.length_penalty, early_stopping=settings.early_stopping,
                                stop_ids=stop_ids, **rules)  # fmt: skip


def _in_batches(
    lines: Iterable,
    settings: DecodeSettings,
    encode: Callable[[list, int], dict[int, list[int]]],
    decode: Callable[[list[int], list[list[int]], int], list[Output]],
    extra_tokens: int = 0,
) -> Iterator[Output]:
    """The skeleton every generating task shares: read `lines` in chunks; `encode(chunk,
    first_line)` gives the token ids of the rows to run (the others stay empty); rows are sorted
    by length into token-count batches, `decode(rows, ids, first_line)` gives their Outputs,
    and the chunk's results come out in input order."""
    first_line = 1
    for chunk in _chunks(lines, settings.chunk_lines):
        results: list[Output] = [EMPTY] * len(chunk)
        ids_by_row = encode(chunk, first_line)
        rows = list(ids_by_row)
        lengths = [len(ids_by_row[r]) + extra_tokens for r in rows]
        for batch in _token_batches(lengths, settings.batch_tokens, max(settings.beam_size, 1)):
            batch_rows = [rows[b] for b in batch]
            for r, output in zip(batch_rows, decode(batch_rows, [ids_by_row[r] for r in batch_rows], first_line)):
                results[r] = output
        first_line += len(chunk)
        yield from results


def _suppressed(loaded: LoadedModel) -> tuple[int, ...]:
    # A converted model lists what its generate bans (Marian: the pad), and only that is banned.
    if "suppress_tokens" in loaded.generation:
        return tuple(sorted(loaded.generation["suppress_tokens"]))
    # Never generate padding or a second start token.
    cfg = loaded.config
    banned = {cfg.pad_id}
    if cfg.bos_id != cfg.eos_id:
        banned.add(cfg.bos_id)
    return tuple(sorted(banned))


# ---------------------------------------------------------------- sequence to sequence


@torch.inference_mode()
def seq2seq(
    loaded: LoadedModel,
    sources: Iterable[str],
    settings: DecodeSettings,
    task: str = "translate",
    instruction: Instruction | None = None,
) -> Iterator[Output]:
    """Translate / summarize / answer: one Output per source text, in order. A decoder-only
    (instruct) model answers each text as a chat message (see `instruct`)."""
    if loaded.config.architecture == "decoder-only":
        yield from instruct(loaded, ({"text": text} for text in sources), settings, task, instruction)
        return
    loaded = _with_languages(loaded, instruction or Instruction())
    model, cfg = loaded.model, loaded.config
    settings = with_defaults(settings, loaded, task)
    # What the model's tokenizer puts around a source (BART: <s> ... </s>); ours: ... </s>
    prefix = loaded.generation.get("source_prefix", [])
    suffix = loaded.generation.get("source_suffix", [cfg.eos_id])
    limit = cfg.max_positions - len(prefix) - len(suffix)
    suppress = _suppressed(loaded)

    def encode(chunk: list[str], first_line: int) -> dict[int, list[int]]:
        live = [i for i, text in enumerate(chunk) if text.strip()]
        ids_by_row = {}
        for i, ids in zip(live, loaded.source_tokenizer.encode_batch([chunk[i] for i in live])):
            fitted = _fit(ids, limit, first_line + i, settings.on_long)
            if fitted is not None:
                ids_by_row[i] = prefix + fitted + suffix
        return ids_by_row

    def decode(rows: list[int], src_ids: list[list[int]], first_line: int) -> list[Output]:
        src = pad_rows(src_ids, cfg.pad_id).to(model.device)
        src_mask = pad_rows([[1] * len(x) for x in src_ids], 0).bool().to(model.device)
        cache = model.new_cache(len(src_ids), model.encode(src, src_mask), src_mask)
        start = torch.full((len(src_ids), 1), cfg.start_id, dtype=torch.long, device=model.device)
        if settings.max_len is not None:
            max_new = [settings.max_len] * len(src_ids)
        else:
            max_new = [int(settings.max_len_a * (len(x) - len(prefix) - len(suffix)) + settings.max_len_b) for x in src_ids]
        max_new = [max(1, min(m, cfg.max_positions - 1)) for m in max_new]
        hyps = _decode_batch(loaded, model.step, cache, start, max_new, settings, suppress)
        return [_output(loaded.tokenizer, row_hyps) for row_hyps in hyps]

    yield from _in_batches(sources, settings, encode, decode)


def _with_languages(loaded: LoadedModel, instruction: Instruction) -> LoadedModel:
    """A multilingual encoder-decoder (M2M100, NLLB: generation.json lists its "languages") with
    its source template holding the --source-lang token and the --target-lang token forced first,
    as transformers' tokenizer(src_lang=...) and generate(forced_bos_token_id=...) do. Other
    encoder-decoders take no --prompt, --source-lang or --target-lang."""
    languages = loaded.generation.get("languages")
    if not languages:
        if instruction != Instruction():
            raise UserError("--prompt, --source-lang and --target-lang are for instruct (decoder-only) models "
                            "and multilingual ones (M2M100, NLLB)")  # fmt: skip
        return loaded
    if instruction.prompt is not None:
        raise UserError("--prompt is for instruct (decoder-only) models; this model takes --source-lang and --target-lang")
    examples = ", ".join(c for c in ("eng_Latn", "deu_Latn", "fra_Latn", "zho_Hans", "en", "de", "fr", "zh") if c in languages)
    examples = examples or ", ".join(list(languages)[:4])
    for flag, code in (("--source-lang", instruction.source_lang), ("--target-lang", instruction.target_lang)):
        if code is not None and code not in languages:
            raise UserError(f"{flag} {code!r} is not one of this model's {len(languages)} language codes (e.g. {examples})")
    if instruction.target_lang is None:
        raise UserError(f"this model translates into many languages: give --target-lang, one of its codes (e.g. {examples})")
    gen = dict(loaded.generation)
    source = instruction.source_lang or gen.get("source_lang")
    if source is not None:
        ids = set(languages.values())
        for key in ("source_prefix", "source_suffix"):
            gen[key] = [languages[source] if i in ids else i for i in gen.get(key, [])]
    gen["forced_bos_id"] = languages[instruction.target_lang]
    return dataclasses.replace(loaded, generation=gen)


def _output(tok, hyps: list[decoding.Hypothesis]) -> Output:
    return Output(tok.decode_batch([h.tokens for h in hyps]), [h.score for h in hyps], len(hyps[0].tokens))


# ---------------------------------------------------------------- extractive QA (encoder-only)


@dataclass(frozen=True)
class Answer:
    """A span of the context: its text, probability and character offsets [start, end)."""

    text: str
    score: float
    start: int
    end: int

    @property
    def texts(self) -> list[str]:
        return [self.text]

    @property
    def scores(self) -> list[float]:
        return [self.score]

    @property
    def tokens(self) -> int:
        return 0  # nothing generated


NO_ANSWER = Answer("", 0.0, 0, 0)


@torch.inference_mode()
def extractive_qa(
    loaded: LoadedModel, records: Iterable, max_answer_len: int = 30, on_long: OnLong = "truncate", batch_size: int = 16
) -> Iterator[Answer]:
    """For each record (question, context), the most probable span of the context, as Hugging
    Face's question-answering pipeline picks it: softmax over the context tokens for the start
    and for the end, best start * end with start <= end < start + max_answer_len. The model's
    tokenizer lays out the pair ([CLS] question [SEP] context [SEP], token types 0 then 1);
    a context too long for the model is cut (on_long="truncate"), not strided."""
    model, cfg, tok = loaded.model, loaded.config, loaded.tokenizer.hf
    limit = cfg.max_positions
    line = 0
    for chunk in _chunks(records, batch_size):
        pairs = [(r.question, r.context) for r in chunk]
        live = [i for i, (q, c) in enumerate(pairs) if q.strip() and c.strip()]
        encodings = dict(zip(live, tok.encode_batch([pairs[i] for i in live]) if live else []))
        long = [i for i in live if len(encodings[i].ids) > limit]
        for i in long:
            if _fit(encodings[i].ids, limit, line + i + 1, on_long) is None:
                del encodings[i]
        if long and on_long == "truncate":
            tok.enable_truncation(limit, strategy="only_second")
            try:
                cut = tok.encode_batch([pairs[i] for i in long])
            finally:
                tok.no_truncation()
            encodings.update(zip(long, cut))
        answers = [NO_ANSWER] * len(chunk)
        rows = list(encodings)
        if rows:
            ids = pad_rows([encodings[i].ids for i in rows], cfg.pad_id)
            S = ids.shape[1]
            types = pad_rows([encodings[i].type_ids for i in rows], 0)
            in_context = pad_rows([[int(s == 1) for s in encodings[i].sequence_ids] for i in rows], 0).bool()
            mask = pad_rows([[1] * len(encodings[i].ids) for i in rows], 0).bool()
            device = model.device
            logits = model.span_logits(ids.to(device), mask.to(device), types.to(device)).float().cpu()  # (B, S, 2)
            logits = logits.masked_fill(~in_context[:, :, None], -10000.0)  # HF's pipeline masks with -10000
            start_p, end_p = logits.softmax(dim=1).unbind(-1)  # (B, S) each
            pairs_p = start_p[:, :, None] * end_p[:, None, :]  # (B, S, S): start x end
            allowed = torch.ones(S, S, dtype=torch.bool).triu().tril(max_answer_len - 1)
            pairs_p = pairs_p.masked_fill(~allowed, 0.0)
            best = pairs_p.flatten(1).argmax(1)
            for j, i in enumerate(rows):
                s, e = divmod(int(best[j]), S)
                offsets = encodings[i].offsets
                begin, finish = offsets[s][0], offsets[e][1]
                context = pairs[i][1]
                answers[i] = Answer(context[begin:finish], float(pairs_p[j].flatten()[best[j]]), begin, finish)
        line += len(chunk)
        yield from answers


def answer_questions(
    loaded: LoadedModel, records: Iterable, settings: DecodeSettings, instruction: Instruction | None = None
) -> Iterator[Output | Answer]:
    """An answer per record: a span of its context from an encoder-only model (BERT), generated
    by an encoder-decoder one from "question: ... context: ...", or by an instruct model."""
    if loaded.config.architecture == "decoder-only":
        return instruct(loaded, ({"question": r.question, "context": r.context} for r in records), settings, "qa", instruction)
    if loaded.config.architecture == "encoder-only":
        settings = with_defaults(settings, loaded, "qa")
        return extractive_qa(loaded, records, max_answer_len=settings.max_len, on_long=settings.on_long)
    return seq2seq(loaded, (qa_source(r.question, r.context) for r in records), settings, "qa")


# ---------------------------------------------------------------- instruct models for the seq2seq tasks

# Each input becomes one user message, rendered with the model's chat template. The prompts are
# str.format templates over the task's inputs ({text}; qa: {question}, {context}) and
# {source_lang}, {target_lang}; `--prompt` replaces them.
INSTRUCT_PROMPTS = {
    "translate": "Translate the following text into {target_lang}. Reply with the translation only.\n\n{text}",
    "translate_from": "Translate the following {source_lang} text into {target_lang}. Reply with the translation only.\n\n{text}",
    "summarize": "Summarize the following text in one or two sentences. Reply with the summary only.\n\n{text}",
    "qa": "Answer the question from the context. Reply with the answer only.\n\nContext: {context}\n\nQuestion: {question}",
}
INSTRUCT_INPUTS = {"translate": ("text",), "summarize": ("text",), "qa": ("question", "context")}
# Deterministic unless asked otherwise, whatever sampling the model's generation_config sets for chat.
INSTRUCT_DEFAULTS = dict(sample=False, beam_size=1, max_len=256, no_repeat_ngram_size=0)


@dataclass(frozen=True)
class Instruction:
    """How an input becomes a user message for an instruct model."""

    prompt: str | None = None  # None: INSTRUCT_PROMPTS
    source_lang: str | None = None
    target_lang: str | None = None

    def message_maker(self, task: str) -> Callable[[dict[str, str]], str]:
        prompt = self.prompt
        if prompt is None:
            prompt = INSTRUCT_PROMPTS["translate_from" if task == "translate" and self.source_lang else task]
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(prompt) if name is not None}
        except ValueError as e:
            raise UserError(f"--prompt {prompt!r}: {e} (write {{{{ and }}}} for literal braces)") from None
        inputs, langs = set(INSTRUCT_INPUTS[task]), {"source_lang", "target_lang"}
        if fields - inputs - langs:
            known = ", ".join("{" + f + "}" for f in (*INSTRUCT_INPUTS[task], *sorted(langs)))
            raise UserError(
                f"--prompt uses {', '.join('{' + f + '}' for f in sorted(fields - inputs - langs))}; {task} knows {known}"
            )
        if not inputs <= fields:
            raise UserError(f"--prompt must contain {' and '.join('{' + f + '}' for f in INSTRUCT_INPUTS[task])}")
        for lang in sorted(fields & langs):
            if getattr(self, lang) is None:
                raise UserError(
                    f"--{lang.replace('_', '-')} is needed: the prompt names it (e.g. --{lang.replace('_', '-')} German)"
                )
        values = {"source_lang": self.source_lang or "", "target_lang": self.target_lang or ""}
        return lambda given: prompt.format(**values, **given)


@torch.inference_mode()
def instruct(
    loaded: LoadedModel,
    inputs: Iterable[dict[str, str]],
    settings: DecodeSettings,
    task: str,
    instruction: Instruction | None = None,
) -> Iterator[Output]:
    """translate / summarize / qa with a decoder-only instruct model: each input (a dict of the
    task's INSTRUCT_INPUTS) is one user message from the task's prompt, rendered with the model's
    chat template; replies are decoded in left-padded batches and end at any stop id. An input
    with an empty field gives an empty output. Too long an input is cut in its text (qa: its
    context), never in the template's own tokens."""
    from llmcli import chat

    template = chat.template_of(loaded.generation)
    if template is None:
        raise UserError(f"{loaded.path} is a decoder-only model without a chat template; {task} needs an instruct model "
                        "(or an encoder-decoder one)")  # fmt: skip
    message = (instruction or Instruction()).message_maker(task)
    model, cfg, tok = loaded.model, loaded.config, loaded.tokenizer
    settings = with_defaults(settings.filled(INSTRUCT_DEFAULTS), loaded, task)
    max_new = min(settings.max_len, cfg.max_positions - 1)
    room = cfg.max_positions - max_new
    cut_field = INSTRUCT_INPUTS[task][-1]  # text, or qa's context
    suppress = _suppressed(loaded)

    def render(fields: dict[str, str]) -> str:
        return template.render([{"role": "user", "content": message(fields)}])

    def encode(chunk: list[dict[str, str]], first_line: int) -> dict[int, list[int]]:
        live = [i for i, fields in enumerate(chunk) if all(v.strip() for v in fields.values())]
        ids_by_row = dict(zip(live, tok.encode_batch([render(chunk[i]) for i in live], control_tokens=True)))
        for i in [i for i in live if len(ids_by_row[i]) > room]:
            if _fit(ids_by_row[i], room, first_line + i, settings.on_long) is None:
                del ids_by_row[i]
                continue
            fields = dict(chunk[i])
            while len(ids_by_row[i]) > room:  # truncate: cut the input's text until the message fits
                text_ids = tok.encode(fields[cut_field])
                keep = len(text_ids) - (len(ids_by_row[i]) - room) - 1
                if keep < 1:
                    raise UserError(f"input line {first_line + i}: the prompt alone leaves no room in the model's "
                                    f"{cfg.max_positions} positions for {max_new} new tokens (lower --max-len)")  # fmt: skip
                fields[cut_field] = tok.decode(text_ids[:keep])
                ids_by_row[i] = tok.encode(render(fields), control_tokens=True)
        return ids_by_row

    def decode(rows: list[int], prompts_ids: list[list[int]], first_line: int) -> list[Output]:
        start = pad_rows(prompts_ids, PAD_TOKEN, left=True).to(model.device)
        hyps = _decode_batch(loaded, model.step, model.new_cache(len(prompts_ids)), start, max_new, settings, suppress)  # fmt: skip
        return [Output([t.strip() for t in tok.decode_batch([h.tokens for h in row_hyps])], [h.score for h in row_hyps],
                       len(row_hyps[0].tokens)) for row_hyps in hyps]  # fmt: skip

    yield from _in_batches(inputs, settings, encode, decode, extra_tokens=max_new)


# ---------------------------------------------------------------- decoder-only


@torch.inference_mode()
def generate(
    loaded: LoadedModel,
    prompts: Iterable[str],
    settings: DecodeSettings,
    max_new_tokens: int = 100,
    on_text: Callable[[int, str], None] | None = None,
    task: str = "generate",
) -> Iterator[Output]:
    """Continue each prompt; an empty prompt starts from the beginning of a text.

    `on_text(row, new_text)` streams a single prompt's continuation, piece by piece, as it is produced.
    """
    model, cfg, tok = loaded.model, loaded.config, loaded.tokenizer
    if max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    settings = with_defaults(settings, loaded, task)
    prefix, suffix = prompt_affixes(loaded)
    room = cfg.max_positions - max_new_tokens - len(prefix) - len(suffix)
    if room < 0:
        raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room in the model's {cfg.max_positions} positions")
    suppress = _suppressed(loaded)
    stop_ids = stop_ids_of(loaded)  # the streamed text leaves them out

    def encode(chunk: list[str], first_line: int) -> dict[int, list[int]]:
        ids_by_row = {}
        for i, ids in enumerate(tok.encode_batch(chunk)):
            if len(ids) > room:  # every kind of position: past the context the model was not trained
                fitted = _fit(ids, room, first_line + i, settings.on_long)
                if fitted is None:
                    continue
                ids = fitted[-room:] if room else []  # keep the end of the prompt: it is what is continued
            ids_by_row[i] = (prefix + ids + suffix) or [cfg.bos_id]  # an empty prompt starts a text
        return ids_by_row

    def decode(rows: list[int], prompts_ids: list[list[int]], first_line: int) -> list[Output]:
        start = pad_rows(prompts_ids, PAD_TOKEN, left=True).to(model.device)
        on_tokens = None
        if on_text is not None and len(rows) == 1:
            text = tok.stream()

            def on_tokens(row_indices, tokens):
                if tokens[0] not in stop_ids and (piece := text.push(tokens[0])):
                    on_text(first_line - 1 + rows[0], piece)

        hyps = _decode_batch(loaded, model.step, model.new_cache(len(prompts_ids)), start, max_new_tokens, settings,
                             suppress, on_tokens)  # fmt: skip
        return [_output(tok, row_hyps) for row_hyps in hyps]

    yield from _in_batches(prompts, settings, encode, decode, extra_tokens=max_new_tokens)


def perplexity(spec: str, text_lines: list[str], *, stride: int | None = None, per_line: bool = False,
               batch_tokens: int = 8192, precision: str = "fp32") -> dict:  # fmt: skip
    """Perplexity of a decoder-only model (`-m` spec) on text, as the field computes it.

    By default the lines are one text (joined with "\\n"), tokenized as the model's tokenizer
    does (its prefix, e.g. Llama's <s>; an llmcli model's bos; no eos of our own), and scored
    in windows of the model's context. Without `stride` the windows do not overlap and every
    token is scored once (lm-eval-harness's rolling loglikelihood); with it, HF's fixed-length
    strided loop (https://huggingface.co/docs/transformers/perplexity): windows `stride` tokens
    apart, each scoring only its tokens not scored before. `per_line`: each line a document,
    [bos] line [eos], scored on its own.

    Returns perplexity ("score"), the mean loss in nats per token, the tokens scored, bits per
    byte (total nats / ln 2 / UTF-8 bytes of the text: comparable across tokenizers), the
    context and stride used, and the lines read ("n").
    """
    if stride is not None and stride < 1:
        raise UserError(f"--stride {stride} must be at least 1")
    if per_line and stride is not None:
        raise UserError("--stride windows the text as one stream; --per-line scores each line on its own")
    if batch_tokens < 1:
        raise UserError(f"batch_tokens {batch_tokens} must be at least 1")
    if not per_line and not any(text_lines):
        raise UserError("no text to score: every line is empty")
    loaded = open_model(spec, "generate", precision=precision)
    if per_line:
        return _perplexity(loaded, text_lines, batch_tokens)
    return _stream_perplexity(loaded, text_lines, stride, batch_tokens)


Window = tuple[int, int, int]  # (a, b, c): input ids[a:b], predicting ids[a+1:b+1], scoring the targets from ids[c]


def rolling_windows(n: int, context: int) -> list[Window]:
    """Consecutive windows of `context` inputs over `n` tokens, each predicting the `context`
    tokens after the previous one's: every token but the first scored once, with the context
    lm-eval-harness's `get_rolling_token_windows` gives."""
    return [(a, min(a + context, n - 1), a + 1) for a in range(0, n - 1, context)]


def strided_windows(n: int, context: int, stride: int) -> list[Window]:
    """HF's fixed-length strided loop: windows of `context` tokens starting `stride` apart, each
    scoring its tokens after the previous window's end. HF also feeds a window's last token as
    input, whose logits nothing uses; here it is only a target, which leaves the scores as they
    are. As in HF's loop, a stride equal to the context leaves each later window's first token
    unscored (it has no context in its window)."""
    windows, previous_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        first = max(previous_end, begin + 1)
        if first < end:
            windows.append((begin, end - 1, first))
        previous_end = end
        if end == n:
            break
    return windows


def _stream_perplexity(loaded: LoadedModel, lines: list[str], stride: int | None, batch_tokens: int) -> dict:
    cfg, tok = loaded.config, loaded.tokenizer
    context = cfg.max_positions
    if stride is not None and stride > context:
        raise UserError(f"--stride {stride} is larger than the model's context of {context} tokens")
    text = "\n".join(lines)
    # What the model's tokenizer puts around a text, as in `generate` (Llama: <s>, GPT-2: nothing); ours: bos
    prefix, suffix = prompt_affixes(loaded)
    ids = prefix + tok.encode(text) + suffix
    if len(ids) < 2:
        raise UserError("no text to score: one token, and the model's tokenizer adds none before it")
    windows = rolling_windows(len(ids), context) if stride is None else strided_windows(len(ids), context, stride)
    total, count = _score_windows(loaded, [(ids, w) for w in windows], batch_tokens)
    n_bytes = len(text.encode("utf-8"))
    return {"score": math.exp(total / count), "loss": total / count, "tokens": count,
            "bits_per_byte": total / math.log(2) / n_bytes, "bytes": n_bytes, "context": context,
            "stride": stride, "per_line": False, "n": len(lines)}  # fmt: skip


def _perplexity(loaded: LoadedModel, lines: list[str], batch_tokens: int) -> dict:
    """Each line a document, [bos] line [eos]; a line longer than the context in rolling windows."""
    cfg = loaded.config
    rows = []
    for ids in loaded.tokenizer.encode_batch(lines):
        seq = [cfg.bos_id] + ids + [cfg.eos_id]
        rows += [(seq, w) for w in rolling_windows(len(seq), cfg.max_positions)]
    total, count = _score_windows(loaded, rows, batch_tokens)
    if count == 0:
        raise UserError("no text to score: every line is empty")
    n_bytes = sum(len(line.encode("utf-8")) + 1 for line in lines)  # each line and its end, which the eos scores
    return {"score": math.exp(total / count), "loss": total / count, "tokens": count,
            "bits_per_byte": total / math.log(2) / n_bytes, "bytes": n_bytes, "context": cfg.max_positions,
            "stride": None, "per_line": True, "n": len(lines)}  # fmt: skip


@torch.inference_mode()
def _score_windows(loaded: LoadedModel, rows: list[tuple[list[int], Window]], batch_tokens: int) -> tuple[float, int]:
    """The summed negative log-likelihood (nats) of the targets each (ids, window) scores, and their count."""
    model, cfg = loaded.model, loaded.config
    total, count = 0.0, 0
    for batch in _token_batches([b - a + 1 for _, (a, b, _) in rows], batch_tokens, 1):
        picked = [rows[i] for i in batch]
        tokens = pad_rows([ids[a:b] for ids, (a, b, _) in picked], cfg.pad_id)
        labels = pad_rows([[IGNORE_INDEX] * (c - a - 1) + ids[c : b + 1] for ids, (a, b, c) in picked], IGNORE_INDEX)
        logits = model(tokens.to(model.device)).float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).to(model.device),
                                                 ignore_index=IGNORE_INDEX, reduction="sum")  # fmt: skip
        total += loss.item()
        count += int((labels != IGNORE_INDEX).sum())
    return total, count


def describe(loaded: LoadedModel) -> dict:
    cfg = loaded.config
    return {
        "path": str(loaded.path),
        "architecture": cfg.architecture,
        "parameters": loaded.model.num_parameters(),
        **({"members": len(loaded.model.members)} if isinstance(loaded.model, Ensemble) else {}),
        "d_model": cfg.d_model,
        "layers": {"encoder": cfg.n_encoder_layers, "decoder": cfg.n_decoder_layers},
        "heads": cfg.n_heads,
        "kv_heads": cfg.kv_heads,
        "vocab_size": cfg.vocab_size,
        "tgt_vocab_size": cfg.output_vocab_size,
        "max_positions": cfg.max_positions,
        "positions": cfg.positions,
        "norm": f"{cfg.norm} ({cfg.norm_position})",
        "activation": cfg.activation + (" (gated)" if cfg.glu else ""),
        "trained_for": loaded.generation.get("task"),
        "tasks": list(TASKS_BY_ARCHITECTURE[cfg.architecture]),
    }


class ChatSession:
    """A conversation with a decoder-only model.

    With a chat template (generation.json "chat_template"), the conversation is a list of turns
    rendered as transformers' `apply_chat_template(messages, add_generation_prompt=True)` renders
    it, tokenized as it is (the template writes the special tokens; nothing is added); a reply
    ends at any of the model's stop ids (generation.json "stop_ids") and may span lines. When the
    context fills, whole turns are dropped from the oldest; the system message stays.
    Without a template, the history is plain text, each turn a line, kept within the context by
    dropping the oldest tokens, and a reply is one line."""

    def __init__(self, loaded: LoadedModel, settings: DecodeSettings, max_new_tokens: int = 100, system: str | None = None):
        from llmcli import chat

        if max_new_tokens < 1:
            raise UserError("--max-new-tokens must be at least 1")
        self.loaded = loaded
        settings = with_defaults(settings, loaded, "chat")
        self.settings = dataclasses.replace(settings, beam_size=1)  # a reply is streamed: one hypothesis
        self.max_new_tokens = min(max_new_tokens, loaded.config.max_positions // 2)
        self.template = chat.template_of(loaded.generation)
        self.conversation = chat.Conversation(system or None)
        self.stop_ids = stop_ids_of(loaded)
        self.history = ""  # without a template: the turns so far, a line each (the system line apart)
        if self.template is not None:  # a template that refuses a first message (or the system one) says so now
            self.template.render(self.conversation.messages("hello"))

    @property
    def templated(self) -> bool:
        return self.template is not None

    def reset(self) -> None:
        """Forget the turns; the system message stays."""
        self.conversation.reset()
        self.history = ""

    def set_system(self, text: str | None) -> None:
        """A new system message (None or "": none); the turns so far stay."""
        self.conversation.system = text or None

    def prompt_ids(self, message: str) -> list[int]:
        """The ids the model reads to answer `message` (trimming the conversation if need be)."""
        from llmcli import chat

        room = self.loaded.config.max_positions - self.max_new_tokens
        return chat.prompt_ids(self.template, self.conversation, message, self._encode_with_control_tokens, room)

    def _encode_with_control_tokens(self, text: str) -> list[int]:
        return self.loaded.tokenizer.encode(text, control_tokens=True)

    def each_alone(self, messages: Iterable[str]) -> Iterator[Output]:
        """The reply to each message as the first of its own conversation (the system message
        kept); empty in, empty out."""
        for message in messages:
            if not message.strip():
                yield EMPTY
                continue
            self.reset()
            text = self.reply(message)
            yield Output([text], [0.0])
        self.reset()

    def reply(self, message: str, on_text: Callable[[str], None] | None = None) -> str:
        """The model's reply to `message`, added to the conversation; `on_text(new_text)` streams it."""
        if not self.templated:
            return self._plain_reply(message, on_text)
        ids = self.prompt_ids(message)
        text = self._decode(ids, on_text)
        self.conversation.add(message, text)
        return text

    @torch.inference_mode()
    def _decode(self, ids: list[int], on_text: Callable[[str], None] | None) -> str:
        loaded, tok = self.loaded, self.loaded.tokenizer
        model = loaded.model
        start = torch.tensor([ids], dtype=torch.long, device=model.device)
        shown = tok.stream()
        stops = set(self.stop_ids)

        def on_tokens(rows, tokens):
            if tokens[0] not in stops and (piece := shown.push(tokens[0])):
                on_text(piece)

        hyps = _decode_batch(loaded, model.step, model.new_cache(1), start, self.max_new_tokens, self.settings,
                             _suppressed(loaded), on_tokens if on_text is not None else None)  # fmt: skip
        text = tok.decode(hyps[0][0].tokens)
        if on_text is not None and text.startswith(shown.text) and text != shown.text:
            on_text(text[len(shown.text) :])  # what a last incomplete character left unsaid
        return text

    def _plain_reply(self, message: str, on_text: Callable[[str], None] | None) -> str:
        tok, cfg = self.loaded.tokenizer, self.loaded.config
        system = self.conversation.system
        head = f"{system}\n" if system else ""  # kept whole; the oldest of the rest gives way
        body = self.history + message + "\n"
        room = cfg.max_positions - self.max_new_tokens - 1 - len(tok.encode(head))
        if room < 1:
            raise UserError(f"the system message leaves no room in the model's {cfg.max_positions} positions")
        body_ids = tok.encode(body)
        if len(body_ids) > room:
            body = tok.decode(body_ids[-room:])
        shown, ended = [""], [False]

        def stream(row, piece):
            # A reply is one line: show it up to the first newline.
            if on_text is not None and not ended[0]:
                line, ended[0] = piece.split("\n", 1)[0], "\n" in piece
                if line:
                    on_text(line)
                    shown[0] += line

        result = next(generate(self.loaded, [head + body], self.settings, self.max_new_tokens, on_text=stream, task="chat"))
        answer = result.text.split("\n", 1)[0]
        if on_text is not None and len(answer) > len(shown[0]):
            on_text(answer[len(shown[0]) :])
        self.history = body + answer + "\n"
        return answer
