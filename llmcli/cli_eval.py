"""`llmcli eval`: score hypotheses against references. Parse, call `llmcli.metrics`, print."""

from __future__ import annotations

import json
import logging
import sys
from enum import Enum
from typing import List, Optional

import typer

from llmcli import metrics as m
from llmcli.errors import UserError
from llmcli.io import STDIN_NAME, read_lines, read_text, warn


class Metric(str, Enum):
    bleu = "bleu"
    chrf = "chrf"
    ter = "ter"
    rouge = "rouge"
    squad = "squad"
    exact = "exact"
    perplexity = "perplexity"


# Options that mean something only for some metrics: giving them elsewhere is an error.
_OPTION_METRICS = {
    "--tokenize": {"bleu", "rouge"},
    "--lowercase": {"bleu", "chrf", "exact"},
    "--stem": {"rouge"},
    "--confidence": {"bleu", "chrf", "ter", "rouge"},
    "--hyp": {"bleu", "chrf", "ter"},
    "--lang": {"bleu", "ter", "squad"},
    "--model": {"perplexity"},
}
_LABELS = {"bleu": "BLEU", "chrf": "chrF2", "ter": "TER", "exact": "accuracy", "perplexity": "perplexity"}


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


def _check_option_use(metric: str, given: dict[str, bool]) -> None:
    for option, used in given.items():
        if used and metric not in _OPTION_METRICS[option]:
            allowed = ", ".join(sorted(_OPTION_METRICS[option]))
            raise UserError(f"{option} does not apply to --metric {metric} (only to {allowed})")


def _score(value: float, confidence: dict | None = None) -> str:
    text = f"{value:.2f}"
    if confidence:
        text += f"  (95% CI {confidence['low']:.2f}-{confidence['high']:.2f})"
    return text


def _rows(rows: list[tuple[str, str]]) -> str:
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def format_table(result: dict) -> str:
    """The human-readable form of a `llmcli.metrics` result."""
    metric = result["metric"]
    if "systems" in result:
        return _paired_table(result)
    if metric == "rouge":
        ci = "confidence" in result
        header = f"{'':<10} {'F':>6} {'P':>6} {'R':>6}" + ("   F 95% CI" if ci else "")
        lines = [header]
        for kind in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
            s = result[kind]
            line = f"{kind:<10} {s['f']:6.2f} {s['p']:6.2f} {s['r']:6.2f}"
            if ci:
                line += f"   {s['confidence']['low']:.2f}-{s['confidence']['high']:.2f}"
            lines.append(line)
        stem = "yes" if result["stem"] else "no"
        lines.append(f"lines {result['n']}, tokenize {result['tokenize']}, stem {stem}")
        return "\n".join(lines)
    if metric == "squad":
        scoring = "CMRC 2018 (per character)" if result["scoring"] == "cmrc2018" else "SQuAD v1.1"
        rows = [("exact match", _score(result["exact_match"])), ("F1", _score(result["f1"])), ("scoring", scoring)]
    elif metric == "perplexity":
        rows = [
            ("perplexity", _score(result["score"])),
            ("loss", f"{result['loss']:.4f} nats/token"),
            ("tokens", str(result["tokens"])),
        ]
    else:
        rows = [(_LABELS[metric], _score(result["score"], result.get("confidence")))]
        if metric == "bleu":
            precisions = "/".join(f"{p:.1f}" for p in result["precisions"])
            rows.append(
                ("detail", f"{precisions} (BP {result['bp']:.3f}, ratio {result['ratio']:.3f}, "
                           f"hyp_len {result['hyp_len']}, ref_len {result['ref_len']})")
            )
        elif metric == "ter":
            rows.append(("edits", f"{result['num_edits']} over reference length {result['ref_length']:.1f}"))
        elif metric == "exact":
            rows.append(("correct", f"{result['correct']} of {result['n']}"))
    rows.append(("lines", str(result["n"])))
    if "signature" in result:
        rows.append(("signature", result["signature"]))
    return _rows(rows)


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


def eval_command(
    hyp: Optional[str] = typer.Argument(
        None, metavar="[HYP|-]", help="Hypotheses, one per line; '-' or nothing reads stdin.", show_default=False
    ),
    metric: Metric = typer.Option(Metric.bleu, "--metric", help="What to compute."),
    refs: List[str] = typer.Option(
        [],
        "--ref",
        "-r",
        metavar="REF",
        help="Reference file, line i for hypothesis i; repeat for several references. "
        "squad: one SQuAD json (questions in file order) or JSONL with an 'answers' list.",
        show_default=False,
    ),
    more_hyps: List[str] = typer.Option(
        [],
        "--hyp",
        metavar="HYP",
        help="Another system's output; the first system is the baseline of a paired significance test "
        "(bleu, chrf, ter).",
        show_default=False,
    ),
    paired: str = typer.Option(
        "bs",
        "--paired",
        metavar="bs|ar",
        help="Paired test for several systems: bs (bootstrap resampling) or ar (approximate randomization).",
    ),
    tokenize: Optional[str] = typer.Option(
        None,
        "--tokenize",
        "-t",
        metavar="NAME",
        help="bleu: sacrebleu tokenizer (13a, intl, zh, char, none, ...) [default: 13a, zh for Chinese]. "
        "rouge: unicode (keeps every script, CJK per character) or rouge-score (its own ASCII-only one) "
        "[default: unicode].",
        show_default=False,
    ),
    lowercase: bool = typer.Option(False, "--lowercase", help="Case-insensitive (bleu, chrf, exact; TER always is)."),
    lang: str = typer.Option(
        "auto",
        "--lang",
        metavar="LANG",
        help="Target language. zh: BLEU tokenizes as zh, TER splits CJK, SQuAD scores per character "
        "as CMRC 2018 does. auto: zh when the references are mostly Chinese characters. "
        "Any other code: none of that.",
    ),
    stem: bool = typer.Option(False, "--stem", help="rouge: Porter-stem English words."),
    confidence: bool = typer.Option(
        False,
        "--confidence",
        help="Add a 95% bootstrap confidence interval (1000 resamples, seed $SACREBLEU_SEED or 12345).",
    ),
    model: Optional[str] = typer.Option(
        None, "--model", "-m", metavar="DIR", help="perplexity: model directory.", show_default=False
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
) -> None:
    """Score hypotheses against references: BLEU, chrF, TER (sacrebleu), ROUGE (rouge-score),
    SQuAD exact match / F1, exact line match, or a model's perplexity.

    All scores are on a 0-100 scale. bleu/chrf/ter print sacrebleu's signature; rouge
    prints ROUGE-1/2/L/Lsum F, P, R (headline: ROUGE-L F; Lsum splits sentences after
    . ! ? and 。！？); squad prints exact match and F1 (headline: F1).

    \b
    Examples:
      llmcli eval out.de --ref ref.de
      llmcli eval out.de --ref refA.de --ref refB.de --metric chrf --json
      llmcli eval base.de --hyp new.de --ref ref.de           # paired bootstrap test
      llmcli eval summaries.txt --ref gold.txt --metric rouge --stem --confidence
      llmcli eval answers.txt --ref cmrc2018_dev.json --metric squad
      llmcli eval held-out.txt --metric perplexity -m runs/lm
    """
    name = metric.value
    _check_option_use(
        name,
        {
            "--tokenize": tokenize is not None,
            "--lowercase": lowercase,
            "--stem": stem,
            "--confidence": confidence,
            "--hyp": bool(more_hyps),
            "--lang": lang != "auto",
            "--model": model is not None,
        },
    )
    systems = ([hyp] if hyp is not None else []) + list(more_hyps)
    if not systems:
        systems = [STDIN_NAME]
    if (systems + list(refs)).count(STDIN_NAME) > 1:
        raise UserError("stdin ('-') can be read only once")
    if STDIN_NAME in systems and sys.stdin.isatty():
        raise UserError("no hypothesis file given and stdin is a terminal (pass HYP or pipe text in)")
    if len(systems) > 1 and confidence:
        raise UserError("--confidence takes one system; with --hyp the paired bootstrap test reports a 95% CI per system")
    if paired not in ("bs", "ar"):
        raise UserError(f"--paired must be bs or ar, not {paired!r}")
    if name == "perplexity":
        if refs:
            raise UserError("--metric perplexity takes no --ref: it scores the text itself")
        if model is None:
            raise UserError("--metric perplexity needs a model: -m DIR")
    elif not refs:
        raise UserError(f"--metric {name} needs at least one --ref REF")
    elif name == "squad" and len(refs) > 1:
        raise UserError("--metric squad takes one --ref (list several answers per question inside it)")

    _route_library_warnings()
    hyps = [_read_nonempty(path) for path in systems]
    lang_code = None if lang == "auto" else lang

    if name == "perplexity":
        from llmcli.tasks import perplexity

        result = {"metric": "perplexity", **perplexity(model, hyps[0])}
    elif name == "squad":
        answers = m.squad_answers(read_text(refs[0]), _name(refs[0]))
        if not answers:
            raise UserError(f"{_name(refs[0])} holds no questions")
        if len(answers) != len(hyps[0]):
            raise UserError(
                f"{_name(systems[0])} has {len(hyps[0])} lines but {_name(refs[0])} has {len(answers)} questions"
            )
        result = m.squad(hyps[0], answers, lang=lang_code)
    else:
        ref_lines = [_read_nonempty(path) for path in refs]
        for path, lines in zip(systems, hyps):
            for ref_path, ref in zip(refs, ref_lines):
                if len(ref) != len(lines):
                    raise UserError(f"{_name(path)} has {len(lines)} lines but {_name(ref_path)} has {len(ref)}")
        if lang == "auto" and name in ("bleu", "ter"):
            lang_code = "zh" if m.looks_chinese(ref_lines[0]) else None
        if len(systems) > 1:
            result = m.paired_test(
                name, list(zip(map(_name, systems), hyps)), ref_lines,
                test=paired, tokenize=tokenize, lowercase=lowercase, lang=lang_code,
            )  # fmt: skip
        elif name == "bleu":
            result = m.bleu(
                hyps[0], ref_lines, tokenize=tokenize, lowercase=lowercase, lang=lang_code, confidence=confidence
            )
        elif name == "chrf":
            result = m.chrf(hyps[0], ref_lines, lowercase=lowercase, confidence=confidence)
        elif name == "ter":
            result = m.ter(hyps[0], ref_lines, lang=lang_code, confidence=confidence)
        elif name == "rouge":
            result = m.rouge(hyps[0], ref_lines, stem=stem, tokenize=tokenize or "unicode", confidence=confidence)
        else:
            result = m.exact(hyps[0], ref_lines, lowercase=lowercase)

    print(json.dumps(result, ensure_ascii=False) if as_json else format_table(result), flush=True)
