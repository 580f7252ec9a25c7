"""Every script in examples/ runs as documented."""

import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    # The scripts call `llmcli`; put this interpreter's scripts directory first on PATH.
    path = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    return subprocess.run(["bash", str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PATH=path, **(env or {})))  # fmt: skip


def test_train_your_own_then_pipeline(tmp_path):
    out = tmp_path / "numbers"
    trained = run("train_your_own.sh", str(out), env={"STEPS": "30"})
    assert trained.returncode == 0, trained.stderr
    assert "accuracy" in trained.stdout  # the eval table
    assert len((out / "test.zh").read_text(encoding="utf-8").splitlines()) == 20
    piped = run("pipeline.sh", str(out))
    assert piped.returncode == 0, piped.stderr
    lines = piped.stdout.splitlines()
    assert len([line for line in lines if "\t" in line]) == 3
    assert any(line.startswith("chrF2") for line in lines)
