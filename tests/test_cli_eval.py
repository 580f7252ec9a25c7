"""`llmcli eval`: options, output, error messages (CliRunner); pipes, exit codes and clean
stdout (real subprocesses); parity with the sacrebleu command line; examples/score.sh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmcli import metrics
from llmcli.cli import app

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared test data not found at {DATA}")

HYPS = ["the cat sat on the mat", "", "Größe über alles", "猫坐在垫子上", "a quick brown fox"]
REFS_A = ["the cat sat on a mat", "nothing here", "Größe über alles", "猫坐在垫子上。", "the quick brown fox"]
REFS_B = ["a cat was sitting on the mat", "", "Größe zählt", "猫在垫子上", "quick brown foxes"]


@pytest.fixture
def files(tmp_path):
    def write(name: str, lines: list[str]) -> str:
        path = tmp_path / name
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return str(path)

    return types.SimpleNamespace(
        hyp=write("hyp.txt", HYPS), ref=write("ref.txt", REFS_A), ref2=write("ref2.txt", REFS_B), write=write, dir=tmp_path
    )


def invoke(*args: str, input: str | None = None):
    return CliRunner().invoke(app, ["eval", *args], input=input)


def run_json(*args: str, input: str | None = None) -> dict:
    result = invoke(*args, "--json", input=input)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def subprocess_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), NO_COLOR="1")
    env.pop("LLMCLI_DEBUG", None)
    return env


# --- output ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metric, expected",
    [
        ("bleu", lambda: metrics.bleu(HYPS, [REFS_A, REFS_B])),
        ("chrf", lambda: metrics.chrf(HYPS, [REFS_A, REFS_B])),
        ("ter", lambda: metrics.ter(HYPS, [REFS_A, REFS_B])),
        ("rouge", lambda: metrics.rouge(HYPS, [REFS_A, REFS_B])),
        ("exact", lambda: metrics.exact(HYPS, [REFS_A, REFS_B])),
    ],
)
def test_json_is_the_library_result(files, metric, expected):
    got = run_json(files.hyp, "--ref", files.ref, "-r", files.ref2, "--metric", metric)
    assert got == expected()
    assert got["metric"] == metric and got["n"] == len(HYPS)  # the empty line is scored, not dropped


def test_table_has_two_decimals_and_the_signature(files):
    result = invoke(files.hyp, "--ref", files.ref)
    assert result.exit_code == 0 and result.stderr == ""
    score = metrics.bleu(HYPS, [REFS_A])
    assert f"BLEU       {score['score']:.2f}\n" in result.stdout
    assert f"signature  {score['signature']}" in result.stdout and "lines      5" in result.stdout
    assert "\x1b" not in result.stdout


def test_rouge_table_and_json_detail(files):
    got = run_json(files.hyp, "--ref", files.ref, "--metric", "rouge", "--stem", "--confidence")
    for kind in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert set(got[kind]) == {"f", "p", "r", "confidence"}
    assert got["score"] == got["rougeL"]["f"] and "signature" not in got
    assert got["confidence"]["low"] <= got["score"] <= got["confidence"]["high"]
    table = invoke(files.hyp, "--ref", files.ref, "--metric", "rouge").stdout
    assert table.splitlines()[0].split() == ["F", "P", "R"]
    assert f"rouge1     {metrics.rouge(HYPS, [REFS_A])['rouge1']['f']:6.2f}" in table


def test_bleu_options_reach_sacrebleu(files):
    got = run_json(files.hyp, "--ref", files.ref, "--tokenize", "char", "--lowercase", "--confidence")
    assert "tok:char" in got["signature"] and "case:lc" in got["signature"] and "bs:1000" in got["signature"]
    assert got == metrics.bleu(HYPS, [REFS_A], tokenize="char", lowercase=True, confidence=True)
    assert set(got["confidence"]) == {"low", "high", "mean", "n_bootstrap"}


def test_chinese_references_get_the_zh_tokenizer(files):
    zh_hyp = files.write("zh.hyp", ["猫坐在垫子上", "今天天气很好", "我们明天去北京"])
    zh_ref = files.write("zh.ref", ["猫坐在垫子上。", "今天天气不错", "明天我们去北京"])
    assert "tok:zh" in run_json(zh_hyp, "--ref", zh_ref)["signature"]
    assert "tok:13a" in run_json(zh_hyp, "--ref", zh_ref, "--lang", "de")["signature"]
    assert "asian:yes" in run_json(zh_hyp, "--ref", zh_ref, "--metric", "ter")["signature"]
    assert run_json(zh_hyp, "--ref", zh_ref, "--metric", "rouge")["rouge1"]["f"] > 50


def test_stdin_is_the_default_hypothesis(files):
    text = "".join(h + "\n" for h in HYPS)
    assert run_json("--ref", files.ref, input=text) == run_json(files.hyp, "--ref", files.ref)
    assert run_json("-", "--ref", files.ref, input=text)["n"] == 5


def test_paired_test(files):
    other = files.write("other.txt", REFS_B)
    got = run_json(files.hyp, "--hyp", other, "--ref", files.ref)
    assert [s["system"] for s in got["systems"]] == [files.hyp, other]
    assert got["systems"][0]["p_value"] is None and 0 < got["systems"][1]["p_value"] <= 1
    assert got["test"] == "bs" and "confidence" in got["systems"][1]
    table = invoke(files.hyp, "--hyp", other, "--ref", files.ref, "--paired", "ar").stdout
    assert f"Baseline: {files.hyp}" in table and "approximate randomization" in table


def test_squad_from_jsonl_and_json(files):
    gold = files.dir / "gold.jsonl"
    gold.write_text(
        "\n".join(json.dumps({"answers": a}, ensure_ascii=False) for a in (["Denver Broncos"], ["308"], ["北京", "北京市"]))
    )
    hyp = files.write("answers.txt", ["the Broncos", "308", "北京"])
    got = run_json(hyp, "--ref", str(gold), "--metric", "squad")
    assert got["exact_match"] == pytest.approx(200 / 3) and got["f1"] == pytest.approx(100 * (2 / 3 + 1 + 1) / 3)
    assert got["score"] == got["f1"] and got["scoring"] == "squad-v1.1"
    assert run_json(hyp, "--ref", str(gold), "--metric", "squad", "--lang", "zh")["scoring"] == "cmrc2018"
    table = invoke(hyp, "--ref", str(gold), "--metric", "squad").stdout
    assert "exact match  66.67" in table and "F1           88.89" in table


def test_perplexity_calls_the_task_contract(files, monkeypatch):
    calls = []

    def perplexity(model_dir, lines):
        calls.append((model_dir, lines))
        return {"score": 12.5, "n": len(lines), "tokens": 40, "loss": 2.5257}

    fake = types.ModuleType("llmcli.tasks")
    fake.perplexity = perplexity
    monkeypatch.setitem(sys.modules, "llmcli.tasks", fake)
    got = run_json("--metric", "perplexity", "-m", "some/model", files.hyp)
    assert got == {"metric": "perplexity", "score": 12.5, "n": 5, "tokens": 40, "loss": 2.5257}
    assert calls == [("some/model", HYPS)]
    assert "perplexity  12.50" in invoke("--metric", "perplexity", "-m", "m", files.hyp).stdout


def test_invalid_utf8_is_replaced_with_one_warning(files):
    bad = files.dir / "bad.txt"
    bad.write_bytes(b"caf\xe9 au lait\nthe cat\n")
    ref = files.write("ref2lines.txt", ["cafe au lait", "the cat"])
    result = invoke(str(bad), "--ref", ref, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["n"] == 2
    assert result.stderr.count("llmcli: warning:") == 1 and "invalid UTF-8" in result.stderr


def test_sacrebleu_warnings_become_llmcli_warnings(files):
    tokenized = files.write("tok.txt", [f"line {i} ends tokenized ." for i in range(100)])
    result = invoke(tokenized, "--ref", tokenized)
    assert result.exit_code == 0 and result.stdout.startswith("BLEU       100.00")
    assert "llmcli: warning: sacrebleu: That's 100 lines that end in a tokenized period" in result.stderr


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["{hyp}", "--ref", "{short}"], "{hyp} has 5 lines but {short} has 2"),
        (["{hyp}", "--ref", "{ref}", "--ref", "{short}"], "{hyp} has 5 lines but {short} has 2"),
        (["{short}", "--hyp", "{hyp}", "--ref", "{short}"], "{hyp} has 5 lines but {short} has 2"),
        (["{empty}", "--ref", "{ref}"], "{empty} is empty"),
        (["{hyp}", "--ref", "{empty}"], "{empty} is empty"),
        (["{hyp}", "--ref", "{dir}/missing.txt"], "{dir}/missing.txt: no such file"),
        (["{dir}", "--ref", "{ref}"], "{dir} is a directory, not a text file"),
        (["{hyp}"], "--metric bleu needs at least one --ref REF"),
        (["{hyp}", "--ref", "{ref}", "--stem"], "--stem does not apply to --metric bleu (only to rouge)"),
        (["{hyp}", "--ref", "{ref}", "--metric", "ter", "--tokenize", "13a"], "--tokenize does not apply to --metric ter"),
        (["{hyp}", "--ref", "{ref}", "--tokenize", "moses"], "unknown --tokenize 'moses' for bleu"),
        (["{hyp}", "--ref", "{ref}", "--metric", "rouge", "-t", "13a"], "unknown --tokenize '13a' for rouge"),
        (["{hyp}", "--ref", "{ref}", "--metric", "rouge", "--hyp", "{ref}"], "--hyp does not apply to --metric rouge"),
        (["{hyp}", "--ref", "{ref}", "--hyp", "{ref}", "--confidence"], "--confidence takes one system"),
        (["{hyp}", "--ref", "{ref}", "--hyp", "{ref}", "--paired", "t"], "--paired must be bs or ar, not 't'"),
        (["{hyp}", "--metric", "perplexity"], "--metric perplexity needs a model: -m DIR"),
        (["{hyp}", "--metric", "perplexity", "-m", "x", "--ref", "{ref}"], "--metric perplexity takes no --ref"),
        (["{hyp}", "--ref", "{ref}", "-m", "x"], "--model does not apply to --metric bleu"),
        (["{hyp}", "--metric", "squad", "--ref", "{ref}", "--ref", "{ref}"], "--metric squad takes one --ref"),
        (["{hyp}", "--metric", "squad", "--ref", "{gold}"], "{hyp} has 5 lines but {gold} has 2 questions"),
        (["{hyp}", "--metric", "squad", "--ref", "{ref}"], "{ref}:1: not JSON"),
        (["-", "--ref", "-"], "stdin ('-') can be read only once"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(files, args, message):
    names = {
        "hyp": files.hyp,
        "ref": files.ref,
        "short": files.write("short.txt", ["a", "b"]),
        "empty": files.write("empty.txt", []),
        "gold": files.write("gold.jsonl", ['{"answers": ["x"]}', '{"answers": ["y"]}']),
        "dir": str(files.dir),
    }
    result = invoke(*[a.format(**names) for a in args], input="")
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("llmcli: error: " + message.format(**names))
    assert result.stderr.count("\n") == 1


def test_unknown_metric_is_a_usage_error(files):
    result = invoke(files.hyp, "--ref", files.ref, "--metric", "meteor")
    assert result.exit_code == 2 and "meteor" in result.stderr


# --- real processes -----------------------------------------------------------------------------


def test_subprocess_stdout_is_only_the_result(files):
    proc = subprocess.run(
        [sys.executable, "-m", "llmcli", "eval", "--ref", files.ref, "--json", "--metric", "chrf"],
        input="".join(h + "\n" for h in HYPS).encode(),
        capture_output=True,
        env=subprocess_env(),
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stderr == b""
    lines = proc.stdout.decode("utf-8").splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == metrics.chrf(HYPS, [REFS_A])


def test_subprocess_error_exit_code(files):
    short = files.write("short.txt", ["a"])
    proc = subprocess.run(
        [sys.executable, "-m", "llmcli", "eval", files.hyp, "--ref", short],
        capture_output=True,
        env=subprocess_env(),
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 2 and proc.stdout == b""
    assert proc.stderr.decode() == f"llmcli: error: {files.hyp} has 5 lines but {short} has 1\n"


def test_module_imports_no_heavy_libraries():
    code = "import sys, llmcli.cli_eval; print(sorted({'torch', 'sacrebleu', 'rouge_score', 'nltk'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, env=subprocess_env(), cwd=REPO, timeout=60)
    assert proc.stdout.decode().strip() == "[]", proc.stderr.decode()


def test_help_shows_examples_and_defaults():
    result = CliRunner().invoke(app, ["eval", "--help"])
    assert result.exit_code == 0
    for text in ("llmcli eval out.de --ref ref.de", "[default: bleu]", "--confidence", "--paired", "perplexity"):
        assert text in result.stdout


def test_example_script_runs():
    proc = subprocess.run(["bash", str(REPO / "examples" / "score.sh")], capture_output=True, env=subprocess_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode("utf-8")
    expected = metrics.bleu(
        (REPO / "examples/hyp.de").read_text(encoding="utf-8").splitlines(),
        [(REPO / "examples/ref.de").read_text(encoding="utf-8").splitlines()],
    )
    assert f"BLEU       {expected['score']:.2f}" in out
    for heading in ("== chrf", "== ter", "== rouge", "== exact"):
        assert heading in out
    assert json.loads(out.strip().splitlines()[-1])["confidence"]["n_bootstrap"] == 1000


# --- real data through the command line ----------------------------------------------------------


@needs_data
def test_wmt17_published_bleu_through_the_cli():
    wmt17 = DATA / "wmt17_en_de_sacrebleu"
    got = run_json(str(wmt17 / "systems/newstest2017.online-A.0.en-de"), "--ref", str(wmt17 / "newstest2017-ende-ref.de"))
    assert abs(got["score"] - 20.80) < 0.01 and got["n"] == 3004  # line 1 starts with a BOM


@needs_data
def test_paired_bootstrap_equals_the_sacrebleu_command(tmp_path):
    wmt17 = DATA / "wmt17_en_de_sacrebleu"
    paths = {}
    for name, source in [
        ("ref", wmt17 / "newstest2017-ende-ref.de"),
        ("a", wmt17 / "systems/newstest2017.uedin-nmt.4722.en-de"),
        ("b", wmt17 / "systems/newstest2017.KIT.4950.en-de"),
    ]:
        lines = source.read_text(encoding="utf-8").splitlines()[:500]
        paths[name] = tmp_path / f"{name}.txt"
        paths[name].write_text("\n".join(lines) + "\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "sacrebleu", str(paths["ref"]), "-i", str(paths["a"]), str(paths["b"]),
         "--paired-bs", "-m", "bleu", "-f", "json"],
        capture_output=True, env=subprocess_env(), cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    expected = [row["BLEU"] for row in json.loads(proc.stdout)]
    got = run_json(str(paths["a"]), "--hyp", str(paths["b"]), "--ref", str(paths["ref"]))["systems"]
    for mine, theirs in zip(got, expected, strict=True):
        assert mine["score"] == pytest.approx(theirs["score"], abs=1e-9)
        assert mine["p_value"] == theirs["p_value"]
        assert mine["confidence"]["mean"] == pytest.approx(theirs["mean"])
        assert mine["confidence"]["high"] - mine["confidence"]["mean"] == pytest.approx(theirs["ci"])


@needs_data
def test_cmrc2018_json_through_the_cli(tmp_path):
    dev = DATA / "cmrc2018/cmrc2018_dev.json"
    answers = metrics.squad_answers(dev.read_text(encoding="utf-8"))
    hyp = tmp_path / "gold.txt"
    hyp.write_text("".join(a[0] + "\n" for a in answers), encoding="utf-8")
    got = run_json(str(hyp), "--ref", str(dev), "--metric", "squad")
    assert got == {"metric": "squad", "score": 100.0, "n": 3219, "exact_match": 100.0, "f1": 100.0, "scoring": "cmrc2018"}
