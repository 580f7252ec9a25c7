"""`llmcli eval`: score hypotheses against references. Parse, call `llmcli.metrics`, print.

Each metric is one row of `METRICS`: what it checks before reading, how it reads its
references, how it scores, which metric-only options it takes, how its table looks.
`eval_command` only walks that row.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import typer

from llmcli import metrics as m
from llmcli.errors import UserError
from llmcli.io import STDIN_NAME, read_lines, read_text, warn

_LABELS = {"bleu": "BLEU", "chrf": "chrF2", "ter": "TER", "exact": "accuracy"}
Systems = list[tuple[str, list[str]]]  # (name shown in messages, lines) per system; the first is the baseline
Refs = list[list[str]]  # reference streams, refs[k][i] the k-th reference of line i


class _LibraryWarnings(logging.Handler):
    """sacrebleu warns through `logging` (e.g. "It looks like you forgot to detokenize"):
    show those as llmcli warnings instead of bare lines."""

    def emit(self, record: logging.LogRecord) -> None:
        warn(f"sacrebleu: {record.getMessage()}")


def _route_library_warnings() -> None:
    logger = logging.getLogger("sacrebleu")
    if not any(isinstance(h, _LibraryWarnings) for h in logger.handlers):
        logger.addHandler(_LibraryWarnings(logging.WARNING))
        logger.propagate = False


def _name(path: str) -> str:
    return "<stdin>" if path == STDIN_NAME else path


def _read_nonempty(path: str) -> list[str]:
    lines = read_lines(path)
    if not lines:
        raise UserError(f"{_name(path)} is empty")
    return lines


@dataclass(frozen=True)
class _Options:
    """The metric-only options, as the scorers take them."""

    tokenize: str | None
    lowercase: bool
    stem: bool
    confidence: bool
    lang: str | None  # None: auto
    model: str | None
    stride: int | None = None  # perplexity: None, windows that do not overlap
    per_line: bool | None = None  # perplexity: each line a document
    precision: str | None = None  # perplexity: None, fp32


# --- checks before any file is read: the --ref and -m a metric needs -----------------------


def _needs_refs(name: str, refs: list[str], model: str | None) -> None:
    if not refs:
        raise UserError(f"--metric {name} needs at least one --ref REF")


def _needs_one_ref(name: str, refs: list[str], model: str | None) -> None:
    _needs_refs(name, refs, model)
    if len(refs) > 1:
        raise UserError(f"--metric {name} takes one --ref (list several answers per question inside it)")


def _needs_model(name: str, refs: list[str], model: str | None) -> None:
    if refs:
        raise UserError(f"--metric {name} takes no --ref: it scores the text itself")
    if model is None:
        raise UserError(f"--metric {name} needs a model: -m DIR")


# --- readers: reference paths and the systems' (name, lines) -> what the scorer takes ------


def _text_refs(paths: list[str], systems: Systems) -> Refs:
    """Reference streams, each as long as every system's output."""
    refs = [_read_nonempty(path) for path in paths]
    for system, lines in systems:
        for path, ref in zip(paths, refs):
            if len(ref) != len(lines):
                raise UserError(f"{system} has {len(lines)} lines but {_name(path)} has {len(ref)}")
    return refs


def _squad_refs(paths: list[str], systems: Systems) -> list[list[str]]:
    """Gold answers per question, one question per hypothesis line."""
    (path,) = paths  # _needs_one_ref made sure
    ((system, lines),) = systems  # squad takes no --hyp
    answers = m.squad_answers(read_text(path), _name(path))
    if not answers:
        raise UserError(f"{_name(path)} holds no questions")
    if len(answers) != len(lines):
        raise UserError(f"{system} has {len(lines)} lines but {_name(path)} has {len(answers)} questions")
    return answers


def _no_refs(paths: list[str], systems: Systems) -> None:
    return None


# --- scorers: one system's lines, its references, the options -> a `llmcli.metrics` result --


def _target_lang(lang: str | None, refs: Refs) -> str | None:
    # --lang auto: zh when the (first) references are mostly Chinese characters.
    return lang or ("zh" if m.looks_chinese(refs[0]) else None)


def _bleu(hyps: list[str], refs: Refs, o: _Options) -> dict:
    lang = _target_lang(o.lang, refs)
    return m.bleu(hyps, refs, tokenize=o.tokenize, lowercase=o.lowercase, lang=lang, confidence=o.confidence)


def _chrf(hyps: list[str], refs: Refs, o: _Options) -> dict:
    return m.chrf(hyps, refs, lowercase=o.lowercase, confidence=o.confidence)


def _ter(hyps: list[str], refs: Refs, o: _Options) -> dict:
    return m.ter(hyps, refs, lang=_target_lang(o.lang, refs), confidence=o.confidence)


def _rouge(hyps: list[str], refs: Refs, o: _Options) -> dict:
    return m.rouge(hyps, refs, stem=o.stem, tokenize=o.tokenize or "unicode", confidence=o.confidence)


def _squad(hyps: list[str], answers: list[list[str]], o: _Options) -> dict:
    return m.squad(hyps, answers, lang=o.lang)


def _exact(hyps: list[str], refs: Refs, o: _Options) -> dict:
    return m.exact(hyps, refs, lowercase=o.lowercase)


def _paired_test(name: str, systems: Systems, refs: Refs, test: str, o: _Options) -> dict:
    lang = _target_lang(o.lang, refs) if "--lang" in METRICS[name].options else None
    return m.paired_test(name, systems, refs, test=test, tokenize=o.tokenize, lowercase=o.lowercase, lang=lang)


def _perplexity(hyps: list[str], refs: None, o: _Options) -> dict:
    from llmcli.tasks import perplexity  # torch: only when a model is scored

    given = {k: v for k, v in (("stride", o.stride), ("per_line", o.per_line), ("precision", o.precision)) if v is not None}
    return {"metric": "perplexity", **perplexity(o.model, hyps, **given)}


# --- tables: a result -> its human-readable form ----------------------------------------------


def _score(value: float, confidence: dict | None = None) -> str:
    text = f"{value:.2f}"
    if confidence:
        text += f"  (95% CI {confidence['low']:.2f}-{confidence['high']:.2f})"
    return text


def _headline(result: dict) -> tuple[str, str]:
    return _LABELS[result["metric"]], _score(result["score"], result.get("confidence"))


def _table(result: dict, rows: list[tuple[str, str]]) -> str:
    """`rows`, then the lines scored and any signature, as aligned label/value pairs."""
    rows = [*rows, ("lines", str(result["n"]))]
    if "signature" in result:
        rows.append(("signature", result["signature"]))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def _bleu_table(r: dict) -> str:
    precisions = "/".join(f"{p:.1f}" for p in r["precisions"])
    detail = f"{precisions} (BP {r['bp']:.3f}, ratio {r['ratio']:.3f}, hyp_len {r['hyp_len']}, ref_len {r['ref_len']})"
    return _table(r, [_headline(r), ("detail", detail)])


def _chrf_table(r: dict) -> str:
    return _table(r, [_headline(r)])


def _ter_table(r: dict) -> str:
    return _table(r, [_headline(r), ("edits", f"{r['num_edits']} over reference length {r['ref_length']:.1f}")])


def _rouge_table(r: dict) -> str:
    ci = "confidence" in r
    lines = [f"{'':<10} {'F':>6} {'P':>6} {'R':>6}" + ("   F 95% CI" if ci else "")]
    for kind in m.ROUGE_TYPES:
        s = r[kind]
        line = f"{kind:<10} {s['f']:6.2f} {s['p']:6.2f} {s['r']:6.2f}"
        if ci:
            line += f"   {s['confidence']['low']:.2f}-{s['confidence']['high']:.2f}"
        lines.append(line)
    lines.append(f"lines {r['n']}, tokenize {r['tokenize']}, stem {'yes' if r['stem'] else 'no'}")
    return "\n".join(lines)


def _squad_table(r: dict) -> str:
    scoring = "CMRC 2018 (per character)" if r["scoring"] == "cmrc2018" else "SQuAD v1.1"
    return _table(r, [("exact match", _score(r["exact_match"])), ("F1", _score(r["f1"])), ("scoring", scoring)])


def _exact_table(r: dict) -> str:
    return _table(r, [_headline(r), ("correct", f"{r['correct']} of {r['n']}")])


def _perplexity_table(r: dict) -> str:
    rows = [("perplexity", _score(r["score"])), ("loss", f"{r['loss']:.4f} nats/token"), ("tokens", str(r["tokens"]))]
    if "bits_per_byte" in r:
        rows.append(("bits per byte", f"{r['bits_per_byte']:.4f} ({r['bytes']} bytes)"))
    if r.get("per_line"):
        rows.append(("scoring", "each line a document, [bos] line [eos]"))
    elif "context" in r:
        overlap = f"stride {r['stride']}" if r.get("stride") else "windows not overlapping"
        rows.append(("scoring", f"the text as one stream, context {r['context']} tokens, {overlap}"))
    return _table(r, rows)


def _paired_table(result: dict) -> str:
    label = _LABELS[result["metric"]]
    with_ci = "confidence" in result["systems"][0]
    names = [("Baseline: " if i == 0 else "") + s["system"] for i, s in enumerate(result["systems"])]
    width = max(len(n) for n in names + ["system"])
    lines = [f"{'system':<{width}}  {label:>7}" + ("  95% CI       " if with_ci else "") + "  p-value"]
    for name, s in zip(names, result["systems"]):
        line = f"{name:<{width}}  {s['score']:7.2f}"
        if with_ci:
            line += f"  {s['confidence']['low']:6.2f}-{s['confidence']['high']:<6.2f}"
        if s["p_value"] is not None:
            line += f"  {s['p_value']:.4f}" + (" *" if s["p_value"] < 0.05 else "")
        lines.append(line.rstrip())
    test = "bootstrap resampling" if result["test"] == "bs" else "approximate randomization"
    lines.append(f"paired {test} against the baseline; * p < 0.05: the difference is unlikely to be chance")
    lines.append(f"lines {result['n']}, signature {result['signature']}")
    return "\n".join(lines)


def format_table(result: dict) -> str:
    """The human-readable form of a `llmcli.metrics` result."""
    if "systems" in result:
        return _paired_table(result)
    return METRICS[result["metric"]].table(result)


# --- the metrics ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    check: Callable  # (name, ref paths, model) -> None: raises before any file is read
    read_refs: Callable  # (ref paths, Systems) -> the references `score` takes
    score: Callable  # (hyps, references, _Options) -> result dict
    table: Callable  # result -> text
    options: tuple[str, ...]  # the metric-only options it takes; "--hyp": a paired test of several systems


METRICS = {
    "bleu": _Spec(_needs_refs, _text_refs, _bleu, _bleu_table, ("--tokenize", "--lowercase", "--confidence", "--hyp", "--lang")),
    "chrf": _Spec(_needs_refs, _text_refs, _chrf, _chrf_table, ("--lowercase", "--confidence", "--hyp")),
    "ter": _Spec(_needs_refs, _text_refs, _ter, _ter_table, ("--confidence", "--hyp", "--lang")),
    "rouge": _Spec(_needs_refs, _text_refs, _rouge, _rouge_table, ("--tokenize", "--stem", "--confidence")),
    "squad": _Spec(_needs_one_ref, _squad_refs, _squad, _squad_table, ("--lang",)),
    "exact": _Spec(_needs_refs, _text_refs, _exact, _exact_table, ("--lowercase",)),
    "perplexity": _Spec(
        _needs_model, _no_refs, _perplexity, _perplexity_table, ("--model", "--stride", "--per-line", "--precision")
    ),
}
Metric = Enum("Metric", {name: name for name in METRICS}, type=str)  # the --metric choices, in table order


def _check_option_use(name: str, given: dict[str, object]) -> None:
    """Options that mean something only for some metrics: giving them elsewhere is an error."""
    for option, value in given.items():
        if value is not None and option not in METRICS[name].options:
            allowed = ", ".join(sorted(other for other, spec in METRICS.items() if option in spec.options))
            raise UserError(f"{option} does not apply to --metric {name} (only to {allowed})")


def _check_inputs(systems: list[str], refs: list[str], confidence: bool | None, paired: str | None) -> None:
    if (systems + refs).count(STDIN_NAME) > 1:
        raise UserError("stdin ('-') can be read only once")
    if STDIN_NAME in systems and sys.stdin.isatty():
        raise UserError("no hypothesis file given and stdin is a terminal (pass HYP or pipe text in)")
    if len(systems) > 1 and confidence:
        raise UserError("--confidence takes one system; with --hyp the paired bootstrap test reports a 95% CI per system")
    if paired is not None and paired not in ("bs", "ar"):
        raise UserError(f"--paired must be bs or ar, not {paired!r}")
    if paired is not None and len(systems) == 1:
        raise UserError("--paired compares systems: give the others with --hyp HYP")


def eval_command(
    hyp: str | None = typer.Argument(
        None, metavar="[HYP|-]", help="Hypotheses, one per line; '-' or nothing reads stdin.", show_default=False
    ),
    metric: Metric = typer.Option(Metric.bleu, "--metric", help="What to compute."),
    refs: list[str] = typer.Option(
        [],
        "--ref",
        "-r",
        metavar="REF",
        help="Reference file, line i for hypothesis i; repeat for several references. "
        "squad: one SQuAD json (questions in file order) or JSONL with an 'answers' list.",
        show_default=False,
    ),
    more_hyps: list[str] | None = typer.Option(
        None,
        "--hyp",
        metavar="HYP",
        help="Another system's output; the first system is the baseline of a paired significance test (bleu, chrf, ter).",
        show_default=False,
    ),
    paired: str | None = typer.Option(
        None,
        "--paired",
        metavar="bs|ar",
        help="Paired test for several systems: bs (bootstrap resampling) or ar (approximate randomization) [default: bs].",
        show_default=False,
    ),
    tokenize: str | None = typer.Option(
        None,
        "--tokenize",
        "-t",
        metavar="NAME",
        help="bleu: sacrebleu tokenizer (13a, intl, zh, char, none, ...) [default: 13a, zh for Chinese]. "
        "rouge: unicode (keeps every script, CJK per character) or rouge-score (its own ASCII-only one) "
        "[default: unicode].",
        show_default=False,
    ),
    lowercase: bool | None = typer.Option(None, "--lowercase", help="Case-insensitive (bleu, chrf, exact; TER always is)."),
    lang: str = typer.Option(
        "auto",
        "--lang",
        metavar="LANG",
        help="Target language. zh: BLEU tokenizes as zh, TER splits CJK, SQuAD scores per character "
        "as CMRC 2018 does. auto: zh when the references are mostly Chinese characters. "
        "Any other code: none of that.",
    ),
    stem: bool | None = typer.Option(None, "--stem", help="rouge: Porter-stem English words."),
    confidence: bool | None = typer.Option(
        None,
        "--confidence",
        help="Add a 95% bootstrap confidence interval (1000 resamples, seed $SACREBLEU_SEED or 12345).",
    ),
    model: str | None = typer.Option(
        None, "--model", "-m", metavar="DIR", help="perplexity: model directory.", show_default=False
    ),
    stride: int | None = typer.Option(
        None,
        "--stride",
        metavar="S",
        help="perplexity: windows of the model's context S tokens apart, each scoring its tokens not scored "
        "before (Hugging Face's strided perplexity) [default: windows that do not overlap].",
        show_default=False,
    ),
    per_line: bool | None = typer.Option(
        None, "--per-line", help="perplexity: each line a document, [bos] line [eos], instead of one text."
    ),
    precision: str | None = typer.Option(
        None,
        "--precision",
        help="perplexity: fp32 | bf16 | int8 | int4 | auto, as for generate [default: fp32].",
        show_default=False,
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
) -> None:
    """Score hypotheses against references: BLEU, chrF, TER (sacrebleu), ROUGE (rouge-score),
    SQuAD exact match / F1, exact line match, or a model's perplexity.

    Scores are on a 0-100 scale, but perplexity. bleu/chrf/ter print sacrebleu's signature; rouge
    prints ROUGE-1/2/L/Lsum F, P, R (headline: ROUGE-L F; Lsum splits sentences after
    . ! ? and 。！？); squad prints exact match and F1 (headline: F1). perplexity
    scores the file as one text in windows of the model's context, tokenized as the
    model's tokenizer does, and prints tokens, perplexity, loss and bits per byte.

    \b
    Examples:
      llmcli eval out.de --ref ref.de
      llmcli eval out.de --ref refA.de --ref refB.de --metric chrf --json
      llmcli eval base.de --hyp new.de --ref ref.de           # paired bootstrap test
      llmcli eval summaries.txt --ref gold.txt --metric rouge --stem --confidence
      llmcli eval answers.txt --ref cmrc2018_dev.json --metric squad
      llmcli eval held-out.txt --metric perplexity -m runs/lm
      llmcli eval wiki.txt --metric perplexity -m ~/models/gpt2 --stride 512
    """
    name, spec, ref_paths = metric.value, METRICS[metric.value], list(refs)
    lang_code = None if lang == "auto" else lang  # --lang auto means what not giving it does
    given = {
        "--tokenize": tokenize,
        "--lowercase": lowercase,
        "--stem": stem,
        "--confidence": confidence,
        "--hyp": more_hyps,
        "--lang": lang_code,
        "--model": model,
        "--stride": stride,
        "--per-line": per_line,
        "--precision": precision,
    }
    _check_option_use(name, given)
    paths = ([hyp] if hyp is not None else []) + list(more_hyps or []) or [STDIN_NAME]
    _check_inputs(paths, ref_paths, confidence, paired)
    spec.check(name, ref_paths, model)

    _route_library_warnings()
    systems = [(_name(path), _read_nonempty(path)) for path in paths]
    references = spec.read_refs(ref_paths, systems)
    options = _Options(tokenize, bool(lowercase), bool(stem), bool(confidence), lang_code, model, stride, per_line, precision)
    if len(systems) > 1:
        result = _paired_test(name, systems, references, paired or "bs", options)
    else:
        result = spec.score(systems[0][1], references, options)
    print(json.dumps(result, ensure_ascii=False) if as_json else format_table(result), flush=True)
