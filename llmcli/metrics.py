"""Evaluation metrics, one function each, delegating to sacrebleu and rouge-score.

Every function takes hypotheses (one string per segment) and references and returns a
dict ready for `--json`: `metric`, `score` (the headline number), `n` (segments scored),
`signature` where the library has one, plus per-metric detail. Scores are on
sacrebleu's 0-100 scale. Empty hypotheses are scored as empty, never dropped.

`refs` is a list of reference streams, each as long as `hyps` (sacrebleu's layout):
`refs[k][i]` is the k-th reference of segment i.

The libraries are imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import re
import string
from collections import Counter
from collections.abc import Sequence

from llmcli.errors import UserError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
ROUGE_TOKENIZERS = ("unicode", "rouge-score")
CONFIDENCE_SAMPLES = 1000  # sacrebleu's --confidence-n default

# Han ideographs (URO, extension A, compatibility, extensions B-H) and kana: scripts
# written without spaces, so each character is one token.
_CJK = "\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")
_ROUGE_TOKEN = re.compile(rf"[{_CJK}]|(?:(?![{_CJK}])[^\W_])+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])")


def _seed() -> int | None:
    # The same switch sacrebleu's own resampling reads, so all intervals reproduce alike.
    seed = os.environ.get("SACREBLEU_SEED", "12345")
    if seed.lower() == "none":
        return None
    try:
        return int(seed)
    except ValueError:
        raise UserError(f"SACREBLEU_SEED must be an integer or 'none', not {seed!r}") from None


def looks_chinese(texts: Sequence[str]) -> bool:
    """True when most letters and digits in `texts` are Han characters."""
    han = alnum = 0
    for text in texts:
        han += len(_HAN.findall(text))
        alnum += sum(c.isalnum() for c in text)
    return alnum > 0 and 2 * han > alnum


# --- sacrebleu: BLEU, chrF, TER -------------------------------------------------------


def _sacrebleu_metric(name: str, refs, *, tokenize: str | None, lowercase: bool, lang: str | None):
    """The sacrebleu metric object with `refs` cached, as sacrebleu's CLI builds it."""
    import sacrebleu

    if name == "bleu":
        if tokenize is not None and tokenize not in sacrebleu.BLEU.TOKENIZERS:
            choices = ", ".join(sacrebleu.BLEU.TOKENIZERS)
            raise UserError(f"unknown --tokenize {tokenize!r} for bleu (choose from {choices})")
        # trg_lang="zh" makes sacrebleu pick its zh tokenizer unless one is given.
        trg_lang = "zh" if lang == "zh" else ""
        return sacrebleu.BLEU(tokenize=tokenize, lowercase=lowercase, trg_lang=trg_lang, references=refs)
    if name == "chrf":
        return sacrebleu.CHRF(lowercase=lowercase, references=refs)
    if name == "ter":
        # TER is case-insensitive by default in sacrebleu. For Chinese, tercom's
        # normalization with asian_support splits CJK into characters (both are needed).
        chinese = lang == "zh"
        return sacrebleu.TER(normalized=chinese, asian_support=chinese, references=refs)
    raise ValueError(f"not a sacrebleu metric: {name}")


def _bootstrap_scores_of_one_type(metric) -> None:
    """Make sacrebleu's chrF bootstrap scores all float32.

    A resample with no character n-gram in common with its references scores a Python 0.0
    where every other resample scores a numpy float32 (its statistics are float32 arrays),
    and sacrebleu 2.6's `Score.estimate_ci` (`statistics.mean`) raises TypeError on the mix:
    `sacrebleu -m chrf --confidence` itself fails so on short or poor outputs. As float32
    the zeros change no number sacrebleu reports where it works.
    """
    import numpy as np

    compute = metric._compute_score_from_stats

    def score_from_stats(stats):
        score = compute(stats)
        if isinstance(stats, np.ndarray):  # a bootstrap resample; the corpus score itself gets a list
            score.score = stats.dtype.type(score.score)
        return score

    metric._compute_score_from_stats = score_from_stats


def _sacrebleu_score(
    name: str,
    hyps: Sequence[str],
    refs: Sequence[Sequence[str]],
    *,
    tokenize: str | None = None,
    lowercase: bool = False,
    lang: str | None = None,
    confidence: bool = False,
) -> dict:
    """Corpus BLEU, chrF or TER (`name`) with sacrebleu's defaults and signature."""
    metric = _sacrebleu_metric(name, refs, tokenize=tokenize, lowercase=lowercase, lang=lang)
    if confidence:
        _seed()  # sacrebleu reads SACREBLEU_SEED too, with a traceback where it is not a number
        if name == "chrf":
            _bootstrap_scores_of_one_type(metric)
    result = metric.corpus_score(list(hyps), None, n_bootstrap=CONFIDENCE_SAMPLES if confidence else 1)
    out = {
        "metric": name,
        "score": float(result.score),
        "signature": str(metric.get_signature()),
        "n": len(hyps),
    }
    if name == "bleu":
        out.update(
            precisions=[float(p) for p in result.precisions],
            bp=float(result.bp),
            ratio=float(result.ratio),
            hyp_len=int(result.sys_len),
            ref_len=int(result.ref_len),
        )
    elif name == "ter":
        out.update(num_edits=int(result.num_edits), ref_length=float(result.ref_length))
    if confidence:
        # sacrebleu reports the bootstrap mean ± half the central 95% range; its
        # public API exposes them only through Score.format, so read the fields.
        mean, half = float(result._mean), float(result._ci)
        out["confidence"] = {"low": mean - half, "high": mean + half, "mean": mean, "n_bootstrap": CONFIDENCE_SAMPLES}
    return out


def bleu(hyps, refs, *, tokenize=None, lowercase=False, lang=None, confidence=False) -> dict:
    """Corpus BLEU; `tokenize` is a sacrebleu tokenizer name (default 13a, or zh for lang="zh")."""
    return _sacrebleu_score("bleu", hyps, refs, tokenize=tokenize, lowercase=lowercase, lang=lang, confidence=confidence)


def chrf(hyps, refs, *, lowercase=False, confidence=False) -> dict:
    """Corpus chrF2 (character 6-grams, beta 2), sacrebleu's defaults."""
    return _sacrebleu_score("chrf", hyps, refs, lowercase=lowercase, confidence=confidence)


def ter(hyps, refs, *, lang=None, confidence=False) -> dict:
    """Corpus TER (case-insensitive, as sacrebleu's default); lang="zh" scores CJK per character."""
    return _sacrebleu_score("ter", hyps, refs, lang=lang, confidence=confidence)


def paired_test(
    name: str,
    systems: Sequence[tuple[str, Sequence[str]]],
    refs: Sequence[Sequence[str]],
    *,
    test: str = "bs",
    tokenize: str | None = None,
    lowercase: bool = False,
    lang: str | None = None,
) -> dict:
    """Compare systems[1:] with the baseline systems[0] by sacrebleu's paired test.

    `test` is "bs" (paired bootstrap resampling, 1000 resamples, with a 95% CI per
    system) or "ar" (approximate randomization, 10000 trials), as `sacrebleu --paired-bs`
    and `--paired-ar` do.
    """
    from sacrebleu.significance import PairedTest

    if test not in ("bs", "ar"):
        raise UserError(f"unknown paired test {test!r} (choose bs or ar)")
    _seed()
    metric = _sacrebleu_metric(name, refs, tokenize=tokenize, lowercase=lowercase, lang=lang)
    named = [(system, list(hyps)) for system, hyps in systems]
    signatures, table = PairedTest(named, {name: metric}, references=None, test_type=test)()
    (column,) = [key for key in table if key != "System"]
    rows = []
    for system, res in zip(table["System"], table[column]):
        row = {"system": system, "score": float(res.score), "p_value": res.p_value}
        if res.mean is not None:
            row["confidence"] = {"low": float(res.mean - res.ci), "high": float(res.mean + res.ci), "mean": float(res.mean)}
        rows.append(row)
    return {
        "metric": name,
        "score": rows[0]["score"],
        "signature": str(signatures[column]),
        "n": len(named[0][1]),
        "test": test,
        "systems": rows,
    }


# --- ROUGE ------------------------------------------------------------------------------


class UnicodeRougeTokenizer:
    """rouge-score's tokenizer, but keeping every script.

    rouge-score keeps only [a-z0-9] runs, so Chinese (or Greek, or "ü") vanishes and a
    Chinese summary scores 0 against itself. Here a token is one CJK character or a run
    of other letters and digits. ASCII tokens go through rouge-score's own tokenizer
    (with its Porter stemming), so on ASCII text the tokens are rouge-score's exactly.
    """

    def __init__(self, use_stemmer: bool = False):
        from nltk.stem import porter

        self._stemmer = porter.PorterStemmer() if use_stemmer else None

    def tokenize(self, text: str) -> list[str]:
        from rouge_score.tokenize import tokenize as rouge_tokenize

        tokens: list[str] = []
        for piece in _ROUGE_TOKEN.findall(text.lower()):
            if piece.isascii():
                tokens += rouge_tokenize(piece, self._stemmer)
            else:
                tokens.append(piece)
        return tokens


def split_sentences(text: str) -> str:
    """One sentence per line, for ROUGE-Lsum: break after . ! ? plus space, and after 。！？.

    A stand-in for the nltk sentence splitter that summarization scripts use before
    ROUGE-Lsum (its model data is a download, which llmcli avoids). Existing line
    breaks stay sentence breaks.
    """
    return "\n".join(s for s in _SENTENCE_END.split(text) if s)


def rouge(
    hyps: Sequence[str],
    refs: Sequence[Sequence[str]],
    *,
    stem: bool = False,
    tokenize: str = "unicode",
    confidence: bool = False,
) -> dict:
    """ROUGE-1/2/L/Lsum F, P, R (0-100) averaged over segments, via rouge-score.

    Several references: each segment takes, per ROUGE type, the reference with the best
    F (rouge-score's `score_multi`). `tokenize` is "unicode" (keeps all scripts, see
    `UnicodeRougeTokenizer`) or "rouge-score" (the library's ASCII-only default).
    The headline `score` is ROUGE-L F.
    """
    import numpy as np
    from rouge_score import rouge_scorer, scoring

    if tokenize not in ROUGE_TOKENIZERS:
        raise UserError(f"unknown --tokenize {tokenize!r} for rouge (choose from {', '.join(ROUGE_TOKENIZERS)})")
    tokenizer = UnicodeRougeTokenizer(stem) if tokenize == "unicode" else None
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=stem, tokenizer=tokenizer)
    per_segment = []
    for i, hyp in enumerate(hyps):
        targets = [split_sentences(ref[i]) for ref in refs]
        per_segment.append(scorer.score_multi(targets, split_sentences(hyp)))

    def mean(values: list[float]) -> float:
        # A plain mean; rouge-score's aggregator reports a bootstrap median instead.
        return 100 * float(np.mean(values)) if values else 0.0

    out: dict = {"metric": "rouge", "score": 0.0, "n": len(hyps), "tokenize": tokenize, "stem": stem}
    for kind in ROUGE_TYPES:
        out[kind] = {
            "f": mean([s[kind].fmeasure for s in per_segment]),
            "p": mean([s[kind].precision for s in per_segment]),
            "r": mean([s[kind].recall for s in per_segment]),
        }
    out["score"] = out["rougeL"]["f"]

    if confidence and per_segment:
        aggregator = scoring.BootstrapAggregator(confidence_interval=0.95, n_samples=CONFIDENCE_SAMPLES)
        for scores in per_segment:
            aggregator.add_scores(scores)
        # The aggregator draws from numpy's global generator: seed it, then put it back.
        state = np.random.get_state()
        seed = _seed()
        if seed is not None:
            np.random.seed(seed)
        try:
            intervals = aggregator.aggregate()
        finally:
            np.random.set_state(state)
        for kind in ROUGE_TYPES:
            low, mid, high = (100 * float(x.fmeasure) for x in intervals[kind])
            out[kind]["confidence"] = {"low": low, "high": high, "mean": mid, "n_bootstrap": CONFIDENCE_SAMPLES}
        out["confidence"] = out["rougeL"]["confidence"]
    return out


# --- SQuAD and CMRC 2018 exact match / F1 -------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def squad_normalize(text: str) -> str:
    """SQuAD's `normalize_answer`: lowercase, drop punctuation and a/an/the, fix whitespace."""
    text = "".join(c for c in text.lower() if c not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def squad_exact(prediction: str, gold: str) -> float:
    return float(squad_normalize(prediction) == squad_normalize(gold))


def squad_f1(prediction: str, gold: str) -> float:
    pred, ref = squad_normalize(prediction).split(), squad_normalize(gold).split()
    if not pred or not ref:
        # evaluate-v2.0.py: an empty answer is right only against an empty one
        # (v1.1 gives 0 there; the two agree everywhere else).
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


# Punctuation removed by CMRC 2018's official cmrc2018_evaluate.py. It is a list of
# strings, so "……" matches only as a pair, never a single "…": kept as published.
_CMRC_PUNCTUATION = [
    "-", ":", "_", "*", "^", "/", "\\", "~", "`", "+", "=",
    "，", "。", "：", "？", "！", "“", "”", "；", "’", "《", "》", "……", "·", "、",
    "「", "」", "（", "）", "－", "～", "『", "』",
]  # fmt: skip
_CMRC_HAN = re.compile("[\u4e00-\u9fa5]")


@functools.cache
def _nltk_word_tokenizer():
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer()


def _cmrc_segments(text: str) -> list[str]:
    """CMRC's `mixed_segmentation(rm_punc=True)`: Han characters one by one, other runs
    through nltk's word tokenizer.

    The official script calls `nltk.word_tokenize`, which first splits sentences with a
    model that is a separate download; the word tokenizer alone differs only for runs
    holding several sentences, which short answers do not.
    """
    words = _nltk_word_tokenizer()
    segments: list[str] = []
    run = ""
    for char in text.lower().strip():
        if char in _CMRC_PUNCTUATION:
            continue
        if _CMRC_HAN.match(char):
            if run:
                segments += words.tokenize(run)
                run = ""
            segments.append(char)
        else:
            run += char
    if run:
        segments += words.tokenize(run)
    return segments


def cmrc_exact(prediction: str, gold: str) -> float:
    def strip(text: str) -> str:
        return "".join(c for c in text.lower().strip() if c not in _CMRC_PUNCTUATION)

    return float(strip(prediction) == strip(gold))


def cmrc_f1(prediction: str, gold: str) -> float:
    """CMRC 2018's F1: over the longest common *contiguous* run of segments."""
    pred, ref = _cmrc_segments(prediction), _cmrc_segments(gold)
    common = difflib.SequenceMatcher(None, ref, pred, autojunk=False).find_longest_match(0, len(ref), 0, len(pred)).size
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad(hyps: Sequence[str], answers: Sequence[Sequence[str]], *, lang: str | None = None) -> dict:
    """Exact match and F1 (0-100), each question taking the best of its gold answers.

    English-style SQuAD v1.1 normalization, or for Chinese (`lang="zh"`, or `None` when
    the gold answers are mostly Han characters) CMRC 2018's character-level scoring.
    A question without gold answers is unanswerable: only an empty answer is right.
    """
    if lang is None:
        lang = "zh" if looks_chinese([a for golds in answers for a in golds]) else "en"
    exact, f1 = (cmrc_exact, cmrc_f1) if lang == "zh" else (squad_exact, squad_f1)
    em_sum = f1_sum = 0.0
    for prediction, golds in zip(hyps, answers):
        golds = list(golds) or [""]
        em_sum += max(exact(prediction, g) for g in golds)
        f1_sum += max(f1(prediction, g) for g in golds)
    n = len(hyps)
    em, f1_score = (100 * em_sum / n, 100 * f1_sum / n) if n else (0.0, 0.0)
    scoring_name = "cmrc2018" if lang == "zh" else "squad-v1.1"
    return {"metric": "squad", "score": f1_score, "n": n, "exact_match": em, "f1": f1_score, "scoring": scoring_name}


def squad_answers(text: str, name: str = "<references>") -> list[list[str]]:
    """Gold answers per question, in file order, from SQuAD json or JSONL.

    SQuAD json: `data[].paragraphs[].qas[].answers[].text`. JSONL: one object per line
    with `answers` as a list of strings, a list of `{"text": ...}`, or Hugging Face's
    `{"text": [...], "answer_start": [...]}`.
    """
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, dict) and "data" in whole:
        try:
            questions = [
                [a["text"] for a in qa["answers"]]
                for article in whole["data"]
                for paragraph in article["paragraphs"]
                for qa in paragraph["qas"]
            ]
        except (KeyError, TypeError) as e:
            raise UserError(f"{name}: not SQuAD json (missing or malformed {e})") from None
        for number, golds in enumerate(questions, start=1):
            if not all(isinstance(g, str) for g in golds):
                raise UserError(f'{name}: question {number}: an answer "text" is not a string')
        return questions

    questions = []
    # Lines end at "\n" only: str.splitlines would also break inside JSON strings holding
    # U+2028, U+0085 and other characters that JSON leaves unescaped.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{name}:{number}: not JSON ({e.msg})") from None
        answers = record.get("answers") if isinstance(record, dict) else None
        if isinstance(answers, dict):
            answers = answers.get("text")
        if not isinstance(answers, list):
            raise UserError(f'{name}:{number}: needs an "answers" list')
        try:
            golds = [a if isinstance(a, str) else a["text"] for a in answers]
        except (KeyError, TypeError):
            golds = None
        if golds is None or not all(isinstance(g, str) for g in golds):
            raise UserError(f'{name}:{number}: each answer must be a string or have a "text" string')
        questions.append(golds)
    return questions


# --- exact line match ---------------------------------------------------------------------


def exact(hyps: Sequence[str], refs: Sequence[Sequence[str]], *, lowercase: bool = False) -> dict:
    """Line accuracy (0-100): a hypothesis is right when it equals one of its references,
    ignoring surrounding whitespace."""

    def norm(text: str) -> str:
        return text.strip().lower() if lowercase else text.strip()

    right = sum(any(norm(h) == norm(ref[i]) for ref in refs) for i, h in enumerate(hyps))
    n = len(hyps)
    return {"metric": "exact", "score": 100 * right / n if n else 0.0, "n": n, "correct": right}
