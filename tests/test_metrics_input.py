"""`llmcli eval` on awkward input and against the libraries it delegates to (issue 16):
line counts, empty files, references of different lengths, CJK and mixed scripts, NUL and
invalid UTF-8; every metric's number equals sacrebleu's / rouge-score's / the official
SQuAD script's (property-based, few examples); every option combination of the eval table
gives the library's result or one line; chrF --confidence (a sacrebleu TypeError)."""

from __future__ import annotations

import collections
import itertools
import json
import re
import string
import types

import pytest
import sacrebleu
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer
from typer.testing import CliRunner

from llmcli import metrics
from llmcli.cli import app
from llmcli.cli_eval import METRICS
from llmcli.errors import UserError

HYPS = ["the cat sat on the mat", "", "Größe über alles", "猫坐在垫子上", "a\x00b quick fox", "مرحبا بالعالم"]
REFS_A = ["the cat sat on a mat", "nothing here", "Größe über alles", "猫坐在垫子上。", "ab quick fox", "مرحبا"]
REFS_B = ["a cat was sitting on the mat", "", "Größe zählt", "猫在垫子上", "the quick fox", "بالعالم"]
FEW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture
def files(tmp_path):
    def write(name: str, lines: list[str]) -> str:
        path = tmp_path / name
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return str(path)

    return types.SimpleNamespace(
        hyp=write("hyp.txt", HYPS), ref=write("ref.txt", REFS_A), ref2=write("ref2.txt", REFS_B), write=write, dir=tmp_path
    )


def invoke(*args: str, input: str | None = None, env: dict | None = None):
    return CliRunner().invoke(app, ["eval", *args], input=input, env=env)


def run_json(*args: str, input: str | None = None) -> dict:
    result = invoke(*args, "--json", input=input)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def one_line_error(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("llmcli: error: " + message), result.stderr
    assert result.stderr.count("\n") == 1


# --- line counts and empty input ------------------------------------------------------------


@pytest.mark.parametrize(
    "hyp, refs, message",
    [
        # several --ref of different lengths: the first that disagrees is named
        (["a", "b", "c"], [["a", "b"], ["a", "b", "c"]], "{hyp} has 3 lines but {ref0} has 2"),
        (["a", "b"], [["a", "b"], ["a", "b", "c"]], "{hyp} has 2 lines but {ref1} has 3"),
        # an empty hypothesis file, or stdin with nothing in it
        ([], [["a"]], "{hyp} is empty"),
    ],
)
def test_line_counts_are_checked_before_scoring(files, hyp, refs, message):
    names = {"hyp": files.write("h.txt", hyp)} | {f"ref{i}": files.write(f"r{i}.txt", r) for i, r in enumerate(refs)}
    for metric in ("bleu", "chrf", "ter", "rouge", "exact"):
        args = [names["hyp"], "--metric", metric, *[a for i in range(len(refs)) for a in ("--ref", names[f"ref{i}"])]]
        one_line_error(invoke(*args), message.format(**names))


def test_empty_stdin_and_a_short_second_system(files):
    one_line_error(invoke("--ref", files.ref, input=""), "<stdin> is empty")
    short = files.write("short.txt", HYPS[:2])
    one_line_error(invoke(files.hyp, "--hyp", short, "--ref", files.ref, "--metric", "chrf"), f"{short} has 2 lines")


@pytest.mark.parametrize("metric", ["bleu", "chrf", "ter", "rouge", "exact"])
def test_only_empty_lines_are_scored_not_dropped(files, metric):
    empty = files.write("empty-lines.txt", [""] * len(HYPS))
    got = run_json(empty, "--ref", files.ref, "--metric", metric)
    assert got == getattr(metrics, metric)([""] * len(HYPS), [REFS_A]) and got["n"] == len(HYPS)


# --- NUL, invalid UTF-8, CJK and mixed scripts through the command ---------------------------

# NUL; \xe9 and \xff, invalid UTF-8 amid Japanese, Cyrillic, Han; Arabic.
RAW = b"the\x00cat sat\n" + "猫が".encode() + b"\xe9" + "坐った\nGrüße, мир ".encode() + b"\xff" + " 世界\nمرحبا ok\n".encode()


@pytest.mark.parametrize("metric", ["bleu", "chrf", "ter", "rouge", "exact", "squad"])
def test_nul_invalid_utf8_and_mixed_scripts_score_as_the_library(files, metric):
    bad = files.dir / "bad.txt"
    bad.write_bytes(RAW)
    lines = RAW.decode("utf-8", errors="replace").split("\n")[:-1]
    refs = ["the cat sat", "猫が坐った", "Grüße, мир 世界", "مرحبا ok"]
    if metric == "squad":
        gold = files.dir / "gold.jsonl"
        gold.write_text("".join(json.dumps({"answers": [r]}, ensure_ascii=False) + "\n" for r in refs), encoding="utf-8")
        result = invoke(str(bad), "--ref", str(gold), "--metric", metric, "--json")
        expected = metrics.squad(lines, [[r] for r in refs])
    else:
        result = invoke(str(bad), "--ref", files.write("mixed.ref", refs), "--metric", metric, "--json")
        expected = getattr(metrics, metric)(lines, [refs])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == expected and expected["n"] == 4
    assert result.stderr.count("invalid UTF-8") == 1  # one warning, naming the first bad line
    assert "bad.txt:2:" in result.stderr


def test_cjk_auto_language_reaches_every_metric(files):
    zh = ["猫坐在垫子上", "今天天气很好", "我们明天去北京"]
    zh_ref = ["猫坐在垫子上。", "今天天气不错", "明天我们去北京"]
    hyp, ref = files.write("zh.hyp", zh), files.write("zh.ref", zh_ref)
    assert run_json(hyp, "--ref", ref)["score"] == sacrebleu.corpus_bleu(zh, [zh_ref], tokenize="zh").score
    ter = sacrebleu.TER(normalized=True, asian_support=True).corpus_score(zh, [zh_ref]).score
    assert run_json(hyp, "--ref", ref, "--metric", "ter")["score"] == ter
    # Mixed: Latin references with a few Han characters stay 13a.
    mixed = files.write("mixed.ref", ["the 猫 sat", "hello world", "new york city"])
    assert "tok:13a" in run_json(files.write("m.hyp", ["the cat", "hello", "york"]), "--ref", mixed)["signature"]


# --- every number is the library's own -------------------------------------------------------

SCRIPTS = "abcxyz ABC  éüß  猫坐在垫子上  がのテ  мир  مرحبا  .,!?-'\x00\t"
line = st.text(alphabet=SCRIPTS, max_size=25)


@st.composite
def corpus(draw):
    n = draw(st.integers(1, 5))
    hyps = draw(st.lists(line, min_size=n, max_size=n))
    refs = draw(st.lists(st.lists(line, min_size=n, max_size=n), min_size=1, max_size=2))
    return hyps, refs


@FEW
@given(data=corpus(), tokenize=st.sampled_from(["13a", "intl", "zh", "char", "none"]), lowercase=st.booleans())
def test_bleu_chrf_ter_equal_sacrebleu(data, tokenize, lowercase):
    hyps, refs = data
    assert metrics.bleu(hyps, refs, tokenize=tokenize, lowercase=lowercase)["score"] == (
        sacrebleu.corpus_bleu(hyps, refs, tokenize=tokenize, lowercase=lowercase).score
    )
    assert (
        metrics.chrf(hyps, refs, lowercase=lowercase)["score"]
        == sacrebleu.CHRF(lowercase=lowercase).corpus_score(hyps, refs).score
    )
    assert metrics.ter(hyps, refs)["score"] == sacrebleu.corpus_ter(hyps, refs).score
    zh = sacrebleu.TER(normalized=True, asian_support=True).corpus_score(hyps, refs).score
    assert metrics.ter(hyps, refs, lang="zh")["score"] == zh


def _rouge_score_mean(scorer, hyps, refs, prepare=lambda s: s) -> dict:
    per = [scorer.score_multi([prepare(r[i]) for r in refs], prepare(h)) for i, h in enumerate(hyps)]
    n = len(per)
    return {k: 100 * sum(s[k].fmeasure for s in per) / n for k in metrics.ROUGE_TYPES}


@FEW
@given(data=corpus(), stem=st.booleans())
def test_rouge_equals_rouge_score(data, stem):
    hyps, refs = data
    # rouge-score's own tokenizer: ROUGE-1/2/L straight from the library, no sentence splitting.
    ours = metrics.rouge(hyps, refs, stem=stem, tokenize="rouge-score")
    theirs = _rouge_score_mean(rouge_scorer.RougeScorer(list(metrics.ROUGE_TYPES), use_stemmer=stem), hyps, refs)
    for kind in ("rouge1", "rouge2", "rougeL"):
        assert ours[kind]["f"] == pytest.approx(theirs[kind], abs=1e-9)
    # The unicode tokenizer is rouge-score's scorer given that tokenizer, Lsum on split sentences.
    ours = metrics.rouge(hyps, refs, stem=stem)
    scorer = rouge_scorer.RougeScorer(list(metrics.ROUGE_TYPES), tokenizer=metrics.UnicodeRougeTokenizer(stem))
    theirs = _rouge_score_mean(scorer, hyps, refs, metrics.split_sentences)
    for kind in metrics.ROUGE_TYPES:
        assert ours[kind]["f"] == pytest.approx(theirs[kind], abs=1e-9)


# The official SQuAD scripts (rajpurkar.github.io/SQuAD-explorer), their scoring functions verbatim.
def _v1_normalize_answer(s):
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def _v1_f1_score(prediction, ground_truth):
    prediction_tokens = _v1_normalize_answer(prediction).split()
    ground_truth_tokens = _v1_normalize_answer(ground_truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def _v1_exact_match_score(prediction, ground_truth):
    return _v1_normalize_answer(prediction) == _v1_normalize_answer(ground_truth)


def _v2_get_tokens(s):
    if not s:
        return []
    return _v1_normalize_answer(s).split()


def _v2_compute_f1(a_gold, a_pred):
    gold_toks = _v2_get_tokens(a_gold)
    pred_toks = _v2_get_tokens(a_pred)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


answer = st.lists(st.sampled_from(["the", "a", "an", "Cat", "cat", "dog", "sat", "Mat.", "1998", "—", ",", "!", "é"]), max_size=5)


@FEW
@given(
    questions=st.lists(
        st.tuples(answer.map(" ".join), st.lists(answer.map(" ".join), min_size=1, max_size=3)), min_size=1, max_size=5
    )
)
def test_squad_equals_the_official_script(questions):
    hyps, golds = [q for q, _ in questions], [g for _, g in questions]
    got = metrics.squad(hyps, golds, lang="en")
    em = sum(max(float(_v1_exact_match_score(p, g)) for g in gs) for p, gs in questions)
    f1_v2 = sum(max(_v2_compute_f1(g, p) for g in gs) for p, gs in questions)
    assert got["exact_match"] == pytest.approx(100 * em / len(hyps))
    assert got["f1"] == pytest.approx(100 * f1_v2 / len(hyps))
    # v1.1 and v2.0 differ only for an empty answer against an empty gold (v1.1: F1 0, v2.0: 1).
    if not any(not _v2_get_tokens(p) and any(not _v2_get_tokens(g) for g in gs) for p, gs in questions):
        f1_v1 = sum(max(_v1_f1_score(p, g) for g in gs) for p, gs in questions)
        assert got["f1"] == pytest.approx(100 * f1_v1 / len(hyps))


def test_squad_jsonl_keeps_unicode_line_separators_inside_answers(files):
    # str.splitlines broke these JSON lines apart ("not JSON").
    answers = ["a\u2028b", "c\x85d", "e\x1cf"]
    gold = files.dir / "gold.jsonl"
    gold.write_text("".join(json.dumps({"answers": [a]}, ensure_ascii=False) + "\n" for a in answers), encoding="utf-8")
    assert metrics.squad_answers(gold.read_text(encoding="utf-8")) == [[a] for a in answers]
    got = run_json(files.write("ans.txt", ["a b", "c d", "e f"]), "--ref", str(gold), "--metric", "squad")
    assert got["n"] == 3 and got["exact_match"] == 100  # split() treats the three as spaces, as SQuAD's script does


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"answers": [{"text": 5}]}', 'gold:1: each answer must be a string or have a "text" string'),
        ('{"answers": [null]}', 'gold:1: each answer must be a string or have a "text" string'),
        (json.dumps({"data": [{"paragraphs": [{"qas": [{"answers": [{"text": None}]}]}]}]}), "gold: question 1"),
    ],
)
def test_squad_answers_that_are_not_strings_are_one_line(text, message):
    with pytest.raises(UserError, match=re.escape(message)):
        metrics.squad_answers(text, "gold")


# --- chrF --confidence and the seed ------------------------------------------------------------


def test_chrf_confidence_where_sacrebleu_raises_type_error():
    hyps, refs = ["the cat", "a dog", ""], [["the cat sat", "a dog barks", "x"]]
    with pytest.raises(TypeError):  # sacrebleu 2.6 itself: a resample of only the empty line scores a Python 0.0
        sacrebleu.CHRF().corpus_score(hyps, refs, n_bootstrap=1000)
    ci = metrics.chrf(hyps, refs, confidence=True)["confidence"]
    # sacrebleu's resampling by hand: its seeded indices, its chrF of each resample.
    import numpy as np

    idx = np.random.default_rng(12345).choice(3, size=(1000, 3), replace=True)
    scores = sorted(sacrebleu.CHRF().corpus_score([hyps[i] for i in row], [[refs[0][i] for i in row]]).score for row in idx)
    assert ci["mean"] == pytest.approx(float(np.mean(scores)), abs=1e-4)
    assert ci["high"] - ci["mean"] == pytest.approx(0.5 * (scores[974] - scores[25]), abs=1e-4)


def test_chrf_confidence_equals_sacrebleu_where_it_works():
    hyps, refs = ["the cat sat", "a dog", "hello there"], [["the cat sat on", "a dog barks", "hello world"]]
    direct = sacrebleu.CHRF().corpus_score(hyps, refs, n_bootstrap=1000)
    ci = metrics.chrf(hyps, refs, confidence=True)["confidence"]
    assert ci["mean"] == float(direct._mean) and ci["high"] - ci["mean"] == pytest.approx(float(direct._ci), abs=1e-12)


@pytest.mark.parametrize(
    "args", [["--metric", "chrf", "--confidence"], ["--metric", "rouge", "--confidence"], ["--hyp", "{ref}"]]
)
def test_a_bad_sacrebleu_seed_is_one_line(files, args):
    result = invoke(files.hyp, "--ref", files.ref, *[a.format(ref=files.ref2) for a in args], env={"SACREBLEU_SEED": "x"})
    one_line_error(result, "SACREBLEU_SEED must be an integer or 'none', not 'x'")


# --- every option combination the eval table offers -------------------------------------------

VALUES = {"--tokenize": "char", "--lowercase": None, "--stem": None, "--confidence": None, "--lang": "zh"}
ROUGE_TOKENIZE = "rouge-score"


def _combinations():
    """(metric, options, slow): every subset of each metric's options; the empty set, each
    option alone and the largest sets run always, the rest with -m slow."""
    for name, spec in METRICS.items():
        options = [o for o in spec.options if o not in ("--model", "--stride", "--per-line")]
        if name == "perplexity":
            continue  # test_perplexity_option_combinations, with a model
        for k in range(len(options) + 1):
            for combo in itertools.combinations(options, k):
                largest = k == len(options) or (k == len(options) - 1 and "--hyp" in options)
                yield pytest.param(name, combo, marks=[] if k <= 1 or largest else [pytest.mark.slow])


def _library_result(name: str, combo: tuple[str, ...], other: list[str]) -> dict:
    kw = {o.removeprefix("--"): True for o in combo if VALUES.get(o, "") is None}
    if "--tokenize" in combo:
        kw["tokenize"] = ROUGE_TOKENIZE if name == "rouge" else VALUES["--tokenize"]
    if "--lang" in combo:
        kw["lang"] = "zh"
    if name == "squad":
        return metrics.squad(HYPS, [[r] for r in REFS_A], **kw)
    if "--hyp" in combo:
        kw.pop("confidence", None)
        return metrics.paired_test(name, [("h", HYPS), ("o", other)], [REFS_A, REFS_B], **kw)
    refs = [REFS_A, REFS_B]
    if name == "rouge" and "tokenize" not in kw:
        kw["tokenize"] = "unicode"
    return getattr(metrics, name)(HYPS, refs, **kw)


@pytest.mark.parametrize("name, combo", list(_combinations()), ids=lambda v: v if isinstance(v, str) else "+".join(v) or "-")
def test_every_option_combination(files, name, combo):
    other = REFS_B[::-1]
    args = [files.hyp]
    if name == "squad":
        gold = files.dir / "gold.jsonl"
        gold.write_text("".join(json.dumps({"answers": [r]}, ensure_ascii=False) + "\n" for r in REFS_A), encoding="utf-8")
        args += ["--ref", str(gold)]
    else:
        args += ["--ref", files.ref, "--ref", files.ref2]
    for option in combo:
        if option == "--hyp":
            args += ["--hyp", files.write("other.txt", other)]
        elif option == "--tokenize":
            args += [option, ROUGE_TOKENIZE if name == "rouge" else VALUES[option]]
        elif VALUES[option] is None:
            args.append(option)
        else:
            args += [option, VALUES[option]]
    args += ["--metric", name]
    if "--hyp" in combo and "--confidence" in combo:
        one_line_error(invoke(*args), "--confidence takes one system")
        return
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    expected = _library_result(name, combo, other)
    if "--hyp" in combo:
        got["systems"][0]["system"], got["systems"][1]["system"] = "h", "o"
    assert got == expected
    if "--hyp" not in combo:  # paired tables and --paired ar: test_paired in test_cli_eval.py
        table = invoke(*args)
        assert table.exit_code == 0 and table.stdout.strip(), table.output


def test_paired_without_another_system_is_one_line(files):
    one_line_error(invoke(files.hyp, "--ref", files.ref, "--paired", "ar"), "--paired compares systems")
    one_line_error(invoke(files.hyp, "--ref", files.ref, "--metric", "rouge", "--paired", "bs"), "--paired compares")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A tiny random GPT-2 saved by transformers (converted on first use): no training."""
    pytest.importorskip("transformers")
    from test_convert import build

    d = tmp_path_factory.mktemp("gpt2")
    build("gpt2", d)
    return d


def test_perplexity_option_combinations(tiny_lm, files):
    from llmcli.tasks import perplexity

    lines = ["the cat sat on the mat", "", "a dog ran under the big tree"]
    text = files.write("held-out.txt", lines)
    for extra, kw in [([], {}), (["--stride", "8"], {"stride": 8}), (["--per-line"], {"per_line": True})]:
        got = run_json(text, "--metric", "perplexity", "-m", str(tiny_lm), *extra)
        assert got == {"metric": "perplexity", **perplexity(str(tiny_lm), lines, **kw)}
        assert invoke(text, "--metric", "perplexity", "-m", str(tiny_lm), *extra).exit_code == 0
    one_line_error(invoke(text, "--metric", "perplexity", "-m", str(tiny_lm), "--stride", "8", "--per-line"), "--stride")
    one_line_error(invoke(text, "--metric", "perplexity", "-m", str(tiny_lm), "--stride", "0"), "--stride 0")
