"""llmcli.metrics against sacrebleu's and rouge-score's own APIs, published scores on real
data in ../shared/data (see its SOURCES.md), and hand-checked SQuAD / CMRC cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sacrebleu
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer, tokenizers

from llmcli import metrics
from llmcli.errors import UserError
from llmcli.io import read_lines

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared test data not found at {DATA}")

WMT17 = DATA / "wmt17_en_de_sacrebleu"
WMT24 = DATA / "wmt24"


def _tsv(path: Path) -> list[dict]:
    rows = [line.rstrip("\n").split("\t") for line in path.read_text(encoding="utf-8").splitlines()]
    rows = [r for r in rows if r and not r[0].startswith("#")]
    return [dict(zip(rows[0], r)) for r in rows[1:]]


def _wmt17_expected() -> list[dict]:
    return _tsv(WMT17 / "expected_scores.tsv") if WMT17.is_dir() else []


@pytest.fixture(scope="module")
def wmt17_ref() -> list[str]:
    return read_lines(WMT17 / "newstest2017-ende-ref.de")


# --- BLEU / chrF / TER -------------------------------------------------------------------


@needs_data
@pytest.mark.parametrize("row", _wmt17_expected(), ids=lambda r: r["system"].split(".")[1])
def test_wmt17_bleu_reproduces_published_mteval_scores(row, wmt17_ref):
    hyps = read_lines(WMT17 / "systems" / row["system"])
    result = metrics.bleu(hyps, [wmt17_ref])
    assert abs(result["score"] - float(row["bleu_mteval13a"])) < 0.01
    assert result["n"] == 3004
    assert result["signature"] == "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:" + sacrebleu.__version__


@needs_data
def test_wmt17_chrf_reproduces_published_scores(wmt17_ref):
    rows = [r for r in _wmt17_expected() if r["chrf"] != "-"]
    assert len(rows) == 2
    for row in rows:
        hyps = read_lines(WMT17 / "systems" / row["system"])
        assert abs(metrics.chrf(hyps, [wmt17_ref])["score"] - float(row["chrf"])) < 1e-4


@needs_data
def test_wmt24_two_references_equal_sacrebleu_api():
    hyps = read_lines(WMT24 / "system-outputs/en-de/GPT-4.txt")
    refs = [read_lines(WMT24 / "en-de.refA.txt"), read_lines(WMT24 / "en-de.refB.txt")]
    assert metrics.bleu(hyps, refs)["score"] == sacrebleu.corpus_bleu(hyps, refs).score
    head, head_refs = hyps[:300], [r[:300] for r in refs]
    assert metrics.chrf(head, head_refs)["score"] == sacrebleu.corpus_chrf(head, head_refs).score
    lowercased = metrics.bleu(head, head_refs, lowercase=True, tokenize="intl")
    assert lowercased["score"] == sacrebleu.corpus_bleu(head, head_refs, lowercase=True, tokenize="intl").score
    assert "case:lc" in lowercased["signature"] and "tok:intl" in lowercased["signature"]
    # TER takes ~17 ms per paragraph and reference here: short segments keep the test quick.
    short = [i for i, h in enumerate(hyps) if len(h) < 100]
    short_hyps, short_refs = [hyps[i] for i in short], [[r[i] for i in short] for r in refs]
    assert len(short) > 100
    assert metrics.ter(short_hyps, short_refs)["score"] == sacrebleu.corpus_ter(short_hyps, short_refs).score


@needs_data
def test_wmt24_chinese_bleu_uses_zh_tokenizer():
    hyps = read_lines(WMT24 / "system-outputs/en-zh/GPT-4.txt")
    refs = [read_lines(WMT24 / "en-zh.refA.txt")]
    expected = sacrebleu.BLEU(tokenize="zh").corpus_score(hyps, refs).score
    assert metrics.bleu(hyps, refs, tokenize="zh")["score"] == expected
    by_lang = metrics.bleu(hyps, refs, lang="zh")
    assert by_lang["score"] == expected and "tok:zh" in by_lang["signature"]
    assert metrics.bleu(hyps, refs)["score"] < expected  # 13a splits punctuation only
    assert metrics.looks_chinese(refs[0])
    assert not metrics.looks_chinese(read_lines(WMT24 / "en-de.refA.txt"))
    # Character-level TER is slow on paragraphs (~0.4 s each): short lines only.
    short = [i for i, h in enumerate(hyps) if len(h) < 30]
    short_hyps, short_refs = [hyps[i] for i in short], [[refs[0][i] for i in short]]
    ter = metrics.ter(short_hyps, short_refs, lang="zh")
    assert ter["score"] == sacrebleu.TER(normalized=True, asian_support=True).corpus_score(short_hyps, short_refs).score
    assert "norm:yes" in ter["signature"] and "asian:yes" in ter["signature"] and 10 < ter["score"] < 90


@pytest.mark.parametrize(
    "hyps, refs",
    [
        (["", "a cat sat on the mat", ""], [["", "the cat sat on the mat", "x"]]),
        (["Größe über alles — naïve café"], [["Größe über alles – naive Café"]]),
        (["猫坐在垫子上"], [["猫坐在垫子上。"]]),
        (["the cat", "a dog barked"], [["the cat sat", "the dog barked"], ["a cat", "dog barked loudly"]]),
    ],
    ids=["empty-lines", "unicode", "cjk", "two-refs"],
)
def test_sacrebleu_edge_cases_equal_library(hyps, refs):
    assert metrics.bleu(hyps, refs)["score"] == sacrebleu.corpus_bleu(hyps, refs).score
    assert metrics.chrf(hyps, refs)["score"] == sacrebleu.corpus_chrf(hyps, refs).score
    assert metrics.ter(hyps, refs)["score"] == sacrebleu.corpus_ter(hyps, refs).score
    assert metrics.bleu(hyps, refs)["n"] == len(hyps)


def test_confidence_interval_is_sacrebleus():
    hyps = ["the cat sat on the mat", "a dog", "it rains today", "hello world", "", "one two three four"]
    refs = [["the cat sat on a mat", "a dog barks", "today it rains", "hello there world", "x", "one two three"]]
    result = metrics.bleu(hyps, refs, confidence=True)
    direct = sacrebleu.BLEU().corpus_score(hyps, refs, n_bootstrap=1000)
    ci = result["confidence"]
    assert ci["mean"] == pytest.approx(direct._mean) and ci["high"] - ci["mean"] == pytest.approx(direct._ci)
    assert ci["low"] <= result["score"] <= ci["high"]
    assert "bs:1000" in result["signature"] and "seed:12345" in result["signature"]


@needs_data
@pytest.mark.parametrize("test", ["bs", "ar"])
def test_paired_test_matches_sacrebleu(test, wmt17_ref):
    from sacrebleu.significance import PairedTest

    names = ["newstest2017.uedin-nmt.4722.en-de", "newstest2017.KIT.4950.en-de"]
    systems = [(n, read_lines(WMT17 / "systems" / n)[:600]) for n in names]
    refs = [wmt17_ref[:600]]
    result = metrics.paired_test("bleu", systems, refs, test=test)
    _, expected = PairedTest(systems, {"bleu": sacrebleu.BLEU(references=refs)}, None, test_type=test)()
    assert [s["system"] for s in result["systems"]] == names
    assert [s["score"] for s in result["systems"]] == [r.score for r in expected["BLEU"]]
    assert [s["p_value"] for s in result["systems"]] == [r.p_value for r in expected["BLEU"]]
    assert result["systems"][0]["p_value"] is None and result["score"] == result["systems"][0]["score"]
    assert result["systems"][1]["p_value"] < 0.05  # uedin vs KIT
    assert ("confidence" in result["systems"][1]) == (test == "bs")


def test_unknown_bleu_tokenizer_is_a_user_error():
    with pytest.raises(UserError, match="--tokenize 'moses'"):
        metrics.bleu(["a"], [["a"]], tokenize="moses")


# --- ROUGE ---------------------------------------------------------------------------------

ROUGE_DIR = DATA / "rouge_testdata"


def _rouge_expected() -> list[dict]:
    return _tsv(ROUGE_DIR / "expected_scores.tsv") if ROUGE_DIR.is_dir() else []


@needs_data
@pytest.mark.parametrize("tokenize", metrics.ROUGE_TOKENIZERS)
@pytest.mark.parametrize("row", _rouge_expected(), ids=lambda r: f"{r['pair']}-{r['metric']}-stem:{r['stemmer']}")
def test_rouge_reproduces_rouge155(row, tokenize):
    stem = row["stemmer"] == "yes"
    if row["pair"] == "multi.0":
        # Whole files, one sentence a line, as rouge-score's own test scores them.
        hyps = ["\n".join(read_lines(ROUGE_DIR / "prediction_multi.0.txt"))]
        refs = [["\n".join(read_lines(ROUGE_DIR / "target_multi.0.txt"))]]
    else:
        i = int(row["pair"].removeprefix("line"))
        hyps = [read_lines(ROUGE_DIR / "prediction.txt")[i]]
        refs = [[read_lines(ROUGE_DIR / "target.txt")[i]]]
    got = metrics.rouge(hyps, refs, stem=stem, tokenize=tokenize)[row["metric"]]
    for key, column in (("r", "recall"), ("p", "precision"), ("f", "fmeasure")):
        assert got[key] / 100 == pytest.approx(float(row[column]), abs=5e-6)


def _rouge_score_mean(scorer, hyps, refs, *, split=True) -> dict:
    prep = metrics.split_sentences if split else (lambda s: s)
    per = [scorer.score_multi([prep(r[i]) for r in refs], prep(h)) for i, h in enumerate(hyps)]
    return {
        k: {
            "f": 100 * float(np.mean([s[k].fmeasure for s in per])),
            "p": 100 * float(np.mean([s[k].precision for s in per])),
            "r": 100 * float(np.mean([s[k].recall for s in per])),
        }
        for k in metrics.ROUGE_TYPES
    }


@needs_data
@pytest.mark.parametrize("stem", [False, True])
def test_dialogsum_multi_reference_equals_rouge_score_default(stem):
    records = [json.loads(line) for line in read_lines(DATA / "dialogsum/dialogsum.test.jsonl")][:250]
    hyps = [r["summary1"] for r in records]
    refs = [[r["summary2"] for r in records], [r["summary3"] for r in records]]
    got = metrics.rouge(hyps, refs, stem=stem)
    scorer = rouge_scorer.RougeScorer(list(metrics.ROUGE_TYPES), use_stemmer=stem)
    expected = _rouge_score_mean(scorer, hyps, refs)
    # rouge-score's default tokenizer and ours agree exactly on this (ASCII) English text,
    # and sentence splitting changes only ROUGE-Lsum.
    unsplit = _rouge_score_mean(scorer, hyps, refs, split=False)
    for kind in metrics.ROUGE_TYPES:
        assert got[kind] == pytest.approx(expected[kind], abs=1e-9)
        if kind != "rougeLsum":
            assert got[kind] == pytest.approx(unsplit[kind], abs=1e-9)
    assert got["score"] == got["rougeL"]["f"] and got["n"] == 250
    assert 20 < got["rouge1"]["f"] < 80


@needs_data
def test_chinese_rouge_is_rouge_score_with_the_unicode_tokenizer():
    hyps = read_lines(WMT24 / "system-outputs/en-zh/GPT-4.txt")[:200]
    refs = [read_lines(WMT24 / "en-zh.refA.txt")[:200]]
    got = metrics.rouge(hyps, refs)
    scorer = rouge_scorer.RougeScorer(list(metrics.ROUGE_TYPES), tokenizer=metrics.UnicodeRougeTokenizer())
    expected = _rouge_score_mean(scorer, hyps, refs)
    for kind in metrics.ROUGE_TYPES:
        assert got[kind] == pytest.approx(expected[kind], abs=1e-9)
    assert got["rouge1"]["f"] > 50
    # rouge-score's own tokenizer keeps only the digits and Latin words of these lines.
    assert metrics.rouge(hyps, refs, tokenize="rouge-score")["rouge1"]["f"] < got["rouge1"]["f"] - 20


@needs_data
def test_chinese_titles_score_full_marks_against_themselves():
    titles = [line.split("\t")[-1] for line in read_lines(DATA / "csl_title/test.tsv")]
    got = metrics.rouge(titles, [titles])
    assert got["rouge1"]["f"] == pytest.approx(100) and got["rougeL"]["f"] == pytest.approx(100)
    assert metrics.rouge(titles, [titles], tokenize="rouge-score")["rouge1"]["f"] < 30


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.characters(max_codepoint=127), max_size=80), stem=st.booleans())
def test_unicode_tokenizer_equals_rouge_score_on_ascii(text, stem):
    assert metrics.UnicodeRougeTokenizer(stem).tokenize(text) == tokenizers.DefaultTokenizer(stem).tokenize(text)


@pytest.mark.parametrize(
    "text, tokens",
    [
        ("猫坐在垫子上。", ["猫", "坐", "在", "垫", "子", "上"]),
        ("Größe über ALLES", ["größe", "über", "alles"]),
        ("GPT-4 模型 v2_0", ["gpt", "4", "模", "型", "v2", "0"]),
        ("日本語のテキスト", ["日", "本", "語", "の", "テ", "キ", "ス", "ト"]),
        ("Привет, мир", ["привет", "мир"]),
        ("🙌", []),
    ],
)
def test_unicode_tokenizer_keeps_every_script(text, tokens):
    assert metrics.UnicodeRougeTokenizer().tokenize(text) == tokens


def test_rouge_edge_cases():
    got = metrics.rouge(["", "the cat sat"], [["a cat", "the cat sat"]])
    assert got["n"] == 2 and got["rouge1"]["f"] == pytest.approx(50)  # empty line scores 0, still counted
    # Two references: each type takes the one with the best F.
    multi = metrics.rouge(["the cat sat"], [["a dog ran"], ["the cat sat down"]])
    single = metrics.rouge(["the cat sat"], [["the cat sat down"]])
    assert multi["rouge1"] == single["rouge1"]
    assert metrics.split_sentences("One. Two! 三。四") == "One.\nTwo!\n三。\n四"


def test_rouge_confidence_is_seeded_and_leaves_numpy_alone():
    hyps = ["the cat sat", "a dog", "it rains", "hello world", "one two"]
    refs = [["the cat sat down", "a dog barks", "it rains today", "hello", "one two three"]]
    np.random.seed(0)
    before = np.random.random()
    np.random.seed(0)
    first = metrics.rouge(hyps, refs, confidence=True)
    assert np.random.random() == before
    second = metrics.rouge(hyps, refs, confidence=True)
    assert first == second
    ci = first["confidence"]
    assert ci["low"] <= first["score"] <= ci["high"] and ci == first["rougeL"]["confidence"]


# --- SQuAD / CMRC ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction, gold, em, f1",
    [
        ("The Cat!", "cat", 1, 1),
        ("a big cat", "the cat", 0, 2 / 3),  # "big cat" vs "cat": P 1/2, R 1
        ("Denver Broncos", "Denver Broncos", 1, 1),
        ("Broncos of Denver", "Denver Broncos", 0, 0.8),  # 2 common: P 2/3, R 1
        ("", "cat", 0, 0),
        ("dog", "cat", 0, 0),
        ("", "", 1, 1),  # unanswerable, answered empty
        ("cat cat cat", "cat", 0, 0.5),  # multiset overlap: P 1/3, R 1
    ],
)
def test_squad_hand_checked(prediction, gold, em, f1):
    assert metrics.squad_exact(prediction, gold) == em
    assert metrics.squad_f1(prediction, gold) == pytest.approx(f1)


@pytest.mark.parametrize(
    "prediction, gold, em, f1",
    [
        ("1998年", "1998", 0, 2 / 3),  # segments 1998|年 vs 1998
        ("北京大学", "北京", 0, 2 / 3),
        ("《北京》", "北京", 1, 1),  # CMRC punctuation is removed
        ("北a京", "北京", 0, 0.4),  # longest common *contiguous* run: 1 of 3 and of 2
        ("NBA", "nba", 1, 1),
        ("", "北京", 0, 0),
    ],
)
def test_cmrc_hand_checked(prediction, gold, em, f1):
    assert metrics.cmrc_exact(prediction, gold) == em
    assert metrics.cmrc_f1(prediction, gold) == pytest.approx(f1)


def test_squad_takes_the_best_gold_answer():
    got = metrics.squad(["Broncos", "x"], [["Denver Broncos", "Broncos"], ["y"]])
    assert got["exact_match"] == 50 and got["f1"] == 50 and got["score"] == got["f1"] and got["n"] == 2
    assert metrics.squad([""], [[]])["exact_match"] == 100  # no gold answers: unanswerable


@needs_data
def test_cmrc2018_gold_and_hand_checked_predictions():
    answers = metrics.squad_answers((DATA / "cmrc2018/cmrc2018_dev.json").read_text(encoding="utf-8"))
    assert len(answers) == 3219
    gold = metrics.squad([a[0] for a in answers], answers)
    assert gold["scoring"] == "cmrc2018" and gold["exact_match"] == 100 and gold["f1"] == 100
    assert metrics.squad([""] * len(answers), answers)["f1"] == 0
    # Q0 gold 光荣和ω-force (segments 光|荣|和|ωforce): "光荣" has P 1, R 1/2.
    # Q1 golds 村雨城 / 任天堂游戏谜之村雨城: "谜之村雨城" is best against 村雨城 (P 3/5, R 1).
    # Q2 gold 「战史演武」&「争霸演武」 equals the prediction once 「」 are removed.
    got = metrics.squad(["光荣", "谜之村雨城", "战史演武&争霸演武"], answers[:3])
    assert got["exact_match"] == pytest.approx(100 / 3)
    assert got["f1"] == pytest.approx(100 * (2 / 3 + 0.75 + 1) / 3)


@needs_data
def test_xquad_gold_and_hand_checked_predictions():
    answers = metrics.squad_answers((DATA / "xquad/xquad.en.json").read_text(encoding="utf-8"))
    assert len(answers) == 1190
    golds = [a[0] for a in answers]
    assert metrics.squad(golds, answers)["f1"] == 100
    # Articles and punctuation are normalized away.
    assert metrics.squad([f"The {g}." for g in golds], answers)["exact_match"] == 100
    # golds 308, 136, 118: "308 points" P 1/2; exact; "about 118 tackles" P 1/3.
    got = metrics.squad(["The 308 points.", "136", "about 118 tackles"], answers[:3])
    assert got["scoring"] == "squad-v1.1"
    assert got["exact_match"] == pytest.approx(100 / 3)
    assert got["f1"] == pytest.approx(100 * (2 / 3 + 1 + 0.5) / 3)
    zh = metrics.squad_answers((DATA / "xquad/xquad.zh.json").read_text(encoding="utf-8"))
    assert metrics.squad([a[0] for a in zh], zh)["scoring"] == "cmrc2018"  # detected
    # Gold "136 次" is segmented 136|次: "136" has P 1, R 1/2, and "136次" matches it,
    # where English rules see "136次" as one token that is not in "136 次". (A lone
    # answer that is mostly digits is not detected as Chinese, hence lang="zh".)
    assert metrics.squad(["136"], zh[1:2], lang="zh")["f1"] == pytest.approx(200 / 3)
    assert metrics.squad(["136次"], zh[1:2], lang="zh")["f1"] == 100
    assert metrics.squad(["136次"], zh[1:2], lang="en")["f1"] == 0


def test_squad_answers_jsonl_shapes_and_errors():
    text = "\n".join(
        [
            json.dumps({"answers": ["a", "b"]}),
            json.dumps({"answers": [{"text": "c", "answer_start": 0}]}),
            "",
            json.dumps({"answers": {"text": ["d"], "answer_start": [3]}}),
            json.dumps({"answers": []}),
        ]
    )
    assert metrics.squad_answers(text) == [["a", "b"], ["c"], ["d"], []]
    assert metrics.squad_answers(json.dumps({"answers": ["x"]})) == [["x"]]
    with pytest.raises(UserError, match=r"gold.jsonl:2: needs an \"answers\" list"):
        metrics.squad_answers('{"answers": ["a"]}\n{"question": "q"}', "gold.jsonl")
    with pytest.raises(UserError, match="gold.jsonl:1: not JSON"):
        metrics.squad_answers("{oops", "gold.jsonl")
    with pytest.raises(UserError, match="not SQuAD json"):
        metrics.squad_answers(json.dumps({"data": [{"paragraphs": [{"qas": [{}]}]}]}), "gold.json")


# --- exact ---------------------------------------------------------------------------------------


def test_exact_line_accuracy():
    got = metrics.exact(["yes", "No ", "", "maybe"], [["yes", "no", "", "x"], ["y", "n", "z", "maybe"]])
    assert got == {"metric": "exact", "score": 75.0, "n": 4, "correct": 3}  # "No" != "no"
    assert metrics.exact(["No"], [["no"]], lowercase=True)["score"] == 100
