"""Shared fixtures: isolated user state, tiny corpora and a tiny trained model."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from llmcli import demo_data

# Under pytest-xdist (pyproject's addopts: one worker per core) each worker, and each llmcli
# subprocess a test starts, computes on one thread: the tiny models gain nothing from more, and
# workers times threads past the cores slows every test.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Tiny but real: trains in seconds on one core.
TINY_FIELDS = dict(d_model=32, n_heads=2, n_encoder_layers=1, n_decoder_layers=1, d_ff=64, max_positions=48, dropout=0.1)


def set_args(fields: dict) -> list[str]:
    return [arg for key, value in fields.items() for arg in ("--set", f"{key}={value}")]


TINY_CONFIG = set_args(TINY_FIELDS)


@pytest.fixture(autouse=True)
def isolated_user_state(tmp_path_factory, monkeypatch):
    """No test reads or writes the real ~/.cache, ~/.config or Hugging Face cache."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("LLMCLI_CACHE", str(home / "llmcli-cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "config"))
    monkeypatch.delenv("LLMCLI_MODEL", raising=False)
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LLMCLI_DEBUG", raising=False)
    from llmcli.io import settings

    settings.quiet = False
    yield


@pytest.fixture(scope="session")
def number_corpus(tmp_path_factory) -> Path:
    """English number words -> Chinese numerals: train (400 lines), valid (40), test (20)."""
    d = tmp_path_factory.mktemp("numbers")
    numbers = demo_data.splits(n_train=1400, n_valid=40, n_test=20, seed=7)
    for split, items in numbers.items():
        items = items[:400] if split == "train" else items
        en, zh = demo_data.pairs(items)
        (d / f"{split}.en").write_text("".join(s + "\n" for s in en), encoding="utf-8")
        (d / f"{split}.zh").write_text("".join(s + "\n" for s in zh), encoding="utf-8")
    return d


def train_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--task", "translate", "--src", str(corpus / "train.en"), "--tgt", str(corpus / "train.zh"),
            "--out", str(out), "--vocab-size", "300", "--batch-tokens", "400", "--warmup", "5", "--lr", "3e-3",
            "--quiet", *TINY_CONFIG, *extra]  # fmt: skip


@pytest.fixture(scope="session")
def tiny_model(number_corpus, tmp_path_factory) -> Path:
    """A tiny translate model, trained once per session (undertrained: tests check plumbing, not quality)."""
    from typer.testing import CliRunner

    from llmcli.cli import app

    out = tmp_path_factory.mktemp("models") / "tiny"
    result = CliRunner().invoke(app, train_args(number_corpus, out, "--max-steps", "30"))
    assert result.exit_code == 0, result.output
    return out


def unprivileged() -> list[str]:
    """A command prefix under which file permissions hold: as root, capsh drops the capabilities
    that read and write through them (the test skips where capsh is missing); else nothing."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return []
    capsh = shutil.which("capsh")
    if capsh is None:
        pytest.skip("running as root, which reads through permissions, and capsh (to drop that) is not installed")
    return [capsh, "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", 'exec "$0" "$@"']


def sigint_default() -> None:
    """A child's preexec_fn: SIGINT at its default, as in a terminal's foreground job that Ctrl-C
    reaches. Run from a background job of a non-interactive shell (`pytest &` in a script), the
    tests would pass SIGINT on ignored, and Python installs no KeyboardInterrupt handler then."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli(*args: str, input: bytes | None = None, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """llmcli in a real subprocess: real pipes, signals, exit codes."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "llmcli", *args], input=input, capture_output=True, timeout=timeout,
                          env=full_env)  # fmt: skip


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    """A tiny decoder-only model on a repetitive text, trained once per session."""
    from typer.testing import CliRunner

    from llmcli.cli import app

    d = tmp_path_factory.mktemp("lm")
    text = d / "corpus.txt"
    text.write_text("".join(f"the cat sat on the mat number {i}.\n" for i in range(200)), encoding="utf-8")
    fields = {k: v for k, v in TINY_FIELDS.items() if k != "n_encoder_layers"}
    result = CliRunner().invoke(app, ["train", "--task", "generate", "--text", str(text), "--out", str(d / "lm"),
                                      "--vocab-size", "300", "--batch-tokens", "512", "--block-size", "32",
                                      "--max-steps", "40", "--lr", "3e-3", "--warmup", "5", "--quiet", *set_args(fields)])  # fmt: skip
    assert result.exit_code == 0, result.output
    return d / "lm"
