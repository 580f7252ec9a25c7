"""bench/quality.py end to end on a generated corpus: train, translate at each precision, score,
the learning curve of --curve, and --reuse scoring the kept model again without training it."""

import json
import os
import random
import subprocess
import sys

import pytest
from conftest import REPO, TINY_CONFIG

pytestmark = pytest.mark.slow  # two bench runs, each a training command and several decodes

WORDS = "red blue green small big dog cat man woman runs sits on the street in a park".split()


def corpus(folder, n_train=300, n_test=12):
    """Multi30k's file names over a toy task: the target is the source's words reversed."""
    rng = random.Random(0)
    folder.mkdir()
    sets = {"train": n_train, "val": n_test, "test_2016_flickr": n_test, "test_2017_flickr": n_test}
    for name, n in sets.items():
        src = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7))) for _ in range(n)]
        (folder / f"{name}.en").write_text("".join(s + "\n" for s in src), encoding="utf-8")
        (folder / f"{name}.de").write_text("".join(" ".join(s.split()[::-1]) + "\n" for s in src), encoding="utf-8")


def bench(tmp_path, *args):
    cmd = [sys.executable, str(REPO / "bench" / "quality.py"), "--tasks", "en-de", "--data", str(tmp_path / "data"),
           "--keep", str(tmp_path / "runs"), "--beam", "1", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def bleu_rows(report):
    scores = report["tasks"]["en-de"]["scores"]
    return {(s["test"], s["precision"]): s["score"] for s in scores if s["metric"] == "bleu" and "curve_step" not in s}


def test_quality_bench_trains_scores_and_reuses(tmp_path):
    (tmp_path / "data").mkdir()
    corpus(tmp_path / "data" / "multi30k")
    extra = " ".join(["--preset tiny --vocab-size 300", *TINY_CONFIG])
    bench(tmp_path, "--minutes", "0.1", "--curve", "3", f"--extra-train-args={extra}", "--json", str(tmp_path / "first.json"))
    first = json.loads((tmp_path / "first.json").read_text(encoding="utf-8"))
    assert first["tasks"]["en-de"]["train"]["steps"] > 0
    saves = sorted((tmp_path / "runs" / "en-de" / "model" / "checkpoints").glob("step-*"))
    curve = [s for s in first["tasks"]["en-de"]["scores"] if "curve_step" in s]
    assert [s["curve_step"] for s in curve] == [int(d.name.split("-")[1]) for d in saves[2::3]]
    assert len(curve) >= 2 and all(s["metric"] == "bleu" and s["test"] == "test_2016_flickr" for s in curve)
    minutes = [s["curve_minutes"] for s in curve]
    assert minutes == sorted(minutes) and minutes[-1] <= 0.1
    assert set(bleu_rows(first)) == {("test_2016_flickr", "fp32"), ("test_2017_flickr", "fp32")}
    assert first["sacrebleu_check"]["bleu"]["equal"]

    weights = tmp_path / "runs" / "en-de" / "model" / "model.safetensors"
    trained = weights.stat().st_mtime_ns
    result = bench(tmp_path, "--reuse", "--precisions", "int8,fp32", "--json", str(tmp_path / "second.json"))
    second = json.loads((tmp_path / "second.json").read_text(encoding="utf-8"))
    assert weights.stat().st_mtime_ns == trained, "--reuse trained the model again"
    assert second["tasks"]["en-de"]["train"]["reused"] == str(weights.parent)
    assert second["tasks"]["en-de"]["train"]["steps"] == first["tasks"]["en-de"]["train"]["steps"]
    rows = bleu_rows(second)
    assert set(rows) == {(t, p) for t in ("test_2016_flickr", "test_2017_flickr") for p in ("fp32", "int8")}
    for test in ("test_2016_flickr", "test_2017_flickr"):  # the same model, decoded the same way
        assert rows[(test, "fp32")] == bleu_rows(first)[(test, "fp32")]
    assert second["settings"]["precisions"] == ["fp32", "int8"]  # fp32 first: the others are read against it
    assert "vs fp32" in result.stderr
