"""bench/ensemble.py: an ensemble of a model with itself decodes as the model alone; models of
different vocabularies are refused."""

import shutil
import subprocess
import sys

from conftest import REPO
from typer.testing import CliRunner

from llmcli.cli import app


def ensemble(*args):
    return subprocess.run(
        [sys.executable, str(REPO / "bench" / "ensemble.py"), *args], capture_output=True, text=True, cwd=REPO, timeout=300
    )


def test_a_model_with_itself_translates_as_the_model_alone(tiny_model, number_corpus, tmp_path):
    source = str(number_corpus / "valid.en")
    alone = CliRunner().invoke(app, ["translate", "-m", str(tiny_model), source, "--beam", "4", "--quiet"])
    assert alone.exit_code == 0, alone.output
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    result = ensemble("-m", str(tiny_model), "-m", str(copy), source, "--beam", "4")
    assert result.returncode == 0, result.stderr
    assert result.stdout == alone.stdout
    assert len(result.stdout.splitlines()) == len((number_corpus / "valid.en").read_text().splitlines())


def test_models_of_different_tokenizers_are_refused(tiny_model, number_corpus, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    (other / "tokenizer.json").write_text((other / "tokenizer.json").read_text() + " ")  # the same vocabulary, other bytes
    result = ensemble("-m", str(tiny_model), "-m", str(other), str(number_corpus / "valid.en"))
    assert result.returncode != 0
    assert "its tokenizer differs" in result.stderr


def test_a_missing_model_is_one_line(tiny_model, number_corpus, tmp_path):
    result = ensemble("-m", str(tiny_model), "-m", str(tmp_path / "nowhere"), str(number_corpus / "valid.en"))
    assert result.returncode != 0
    assert result.stderr.strip() == f"ensemble.py: {tmp_path / 'nowhere'}: no such model directory"
