"""Training on several processes (torch.distributed, gloo on CPU), precision, checkpoint averaging.

The two-process runs go through `llmcli train --nproc 2`, i.e. torchrun's own launcher,
each process on one thread; the one-process references run here on one thread too, since
a matrix product may round differently on two.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import typer
from conftest import run_cli, train_args
from safetensors.torch import load_file
from typer.testing import CliRunner

from llmcli import checkpoint
from llmcli.cli import app
from llmcli.config import ModelConfig
from llmcli.data import BatchStream, make_batches
from llmcli.device import check_precision
from llmcli.distributed import World, strip_nproc
from llmcli.errors import UserError
from llmcli.model import Transformer
from llmcli.tokenizer import train_tokenizer
from llmcli.train import _resumed_accumulate

runner = CliRunner()
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def invoke(*args):
    return runner.invoke(app, list(args))


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def data_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    # Dropout stays on (0.1): it is seeded per batch, so it too is the same on 1 or 2 processes.
    return train_args(corpus, out, "--valid-src", str(corpus / "valid.en"), "--valid-tgt", str(corpus / "valid.zh"),
                      "--valid-every", "4", *extra)  # fmt: skip


def last_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "train_state" / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = last_weights(a), last_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-6, msg=name)


def validation_losses(log: str) -> list[str]:
    return re.findall(r"step \d+: validation loss ([0-9.]+)", log)


@pytest.fixture(scope="module")
def one_process_run(number_corpus, tmp_path_factory):
    """8 steps on one process with --accumulate 2: global batch 2 x 400 tokens."""
    out = tmp_path_factory.mktemp("ddp") / "one"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = [a for a in data_args(number_corpus, out, "--accumulate", "2", "--max-steps", "8") if a != "--quiet"]
        result = invoke(*args)
    finally:
        torch.set_num_threads(before)
    assert result.exit_code == 0, result.output
    return out, validation_losses(result.output)


def test_two_processes_give_the_weights_of_one_with_the_same_global_batch(number_corpus, tmp_path, one_process_run):
    one, one_losses = one_process_run
    two = tmp_path / "two"
    args = [a for a in data_args(number_corpus, two, "--nproc", "2", "--max-steps", "8") if a != "--quiet"]
    result = run_cli(*args, env=ONE_THREAD)
    err = result.stderr.decode()
    assert result.returncode == 0, err
    assert_same_weights(one, two)
    # Validation is split over the processes and summed: the same losses, printed once.
    assert validation_losses(err) == one_losses and len(one_losses) == 2
    assert err.count("global batch: 2 processes x --accumulate 1") == 1
    state = json.loads((two / "train_state" / "state.json").read_text())
    assert (state["world_size"], state["options"]["accumulate"], state["progress"]["step"]) == (2, 1, 8)


def test_resume_under_torchrun_on_another_number_of_processes_continues_exactly(
    number_corpus, tmp_path, one_process_run, one_thread
):
    one, _ = one_process_run
    out = tmp_path / "switch"
    first = invoke(*data_args(number_corpus, out, "--accumulate", "2", "--max-steps", "4"))
    assert first.exit_code == 0, first.output
    # No --accumulate: 2 processes x 1 keep the run's 2 batches per step.
    resumed = run_cli("train", "--task", "translate", "--resume", str(out), "--max-steps", "8", "--nproc", "2", env=ONE_THREAD)
    err = resumed.stderr.decode()
    assert resumed.returncode == 0, err
    assert "resuming on 2 processes (was 1): --accumulate 1 keeps 2 batches per step" in err
    assert_same_weights(one, out)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _rank_of(pid: int) -> int | None:
    try:
        env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(v.split(b"=", 1)[1]) for v in env if v.startswith(b"RANK=")]
    return ranks[0] if ranks else None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker processes through /proc")
def test_a_killed_process_stops_the_job_with_one_line(number_corpus, tmp_path):
    args = [a for a in train_args(number_corpus, tmp_path / "m", "--nproc", "2", "--max-steps", "100000") if a != "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "llmcli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, **ONE_THREAD))  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        seen = b""
        while b"parameters" not in seen and time.monotonic() < deadline:  # both processes joined and training
            seen += proc.stderr.readline()
        workers = {_rank_of(p): p for p in _children(proc.pid)}
        assert 1 in workers, (seen, workers)
        os.kill(workers[1], signal.SIGKILL)
        killed = time.monotonic()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert time.monotonic() - killed < 60
    assert proc.returncode != 0
    assert b"Traceback" not in err
    lines = err.decode().strip().splitlines()
    assert lines[-1] == f"llmcli: error: process 1 of 2 (pid {workers[1]}) was killed by SIGKILL; stopped the others"
    assert sum(line.startswith("llmcli: error") for line in lines) == 1


def test_a_user_error_in_every_process_is_one_line(number_corpus, tmp_path):
    result = run_cli(
        *train_args(number_corpus, tmp_path / "m", "--nproc", "2", "--src", str(tmp_path / "missing.en")), env=ONE_THREAD
    )
    assert result.returncode == 2
    err = result.stderr.decode().strip()
    assert err.splitlines() == [f"llmcli: error: {tmp_path / 'missing.en'}: no such file"]


@pytest.mark.parametrize("launched", [False, True])
def test_sigterm_is_one_line_unless_a_worker_llmcli_launched(launched, monkeypatch, capsys):
    # torchrun stops the other workers with SIGTERM when one fails, perhaps while one is still
    # reporting its own error: a launched worker stays quiet, as the launcher gives the one line.
    from llmcli import cli, distributed

    if launched:
        monkeypatch.setenv(distributed.LAUNCHED_ENV, "1")
    else:
        monkeypatch.delenv(distributed.LAUNCHED_ENV, raising=False)

    def command():
        try:
            raise UserError("missing.en: no such file")
        except UserError:
            raise cli.Terminated() from None

    with pytest.raises(typer.Exit) as exit:
        cli.handle_errors(command)()
    assert exit.value.exit_code == 143
    assert capsys.readouterr().err == ("" if launched else "llmcli: terminated\n")


def test_a_global_batch_that_cannot_be_shared_is_refused_and_a_new_one_is_announced(capsys):
    saved = {"options": {"accumulate": 3}, "world_size": 1}
    with pytest.raises(UserError, match="cannot share evenly; pass --accumulate"):
        _resumed_accumulate(saved, None, World(rank=0, size=2), Path("run"), print)
    assert _resumed_accumulate(saved, 2, World(rank=0, size=2), Path("run"), print) == 2
    assert "global batch changes from 3 to 4" in capsys.readouterr().err
    assert (
        _resumed_accumulate({"options": {"accumulate": 1}, "world_size": 4}, None, World(rank=0, size=2), Path("run"), print) == 2
    )


def test_batch_positions_run_on_across_epochs():
    lengths = [5, 9, 3, 12, 7, 7, 2, 30, 4, 8] * 3
    stream = BatchStream(lengths, 40, seed=2)
    n0 = len(make_batches(lengths, 40, 2, 0))
    taken, epoch, index = stream.take(0, n0 - 1, 3)
    assert [(e, i) for e, i, _ in taken] == [(0, n0 - 1), (1, 0), (1, 1)] and (epoch, index) == (1, 2)
    assert taken[1][2] == make_batches(lengths, 40, 2, 1)[0]


def test_strip_nproc():
    assert strip_nproc(["train", "--nproc", "2", "--out", "x", "--nproc=3"]) == ["train", "--out", "x"]


# ---------------------------------------------------------------- precision


def test_bf16_trains_on_cpu_and_fp32_stays_the_default(number_corpus, tmp_path):
    out = tmp_path / "bf16"
    result = invoke(*train_args(number_corpus, out, "--max-steps", "2", "--precision", "bf16"))
    assert result.exit_code == 0, result.output
    state = json.loads((out / "train_state" / "state.json").read_text())
    assert state["options"]["precision"] == "bf16"
    assert all(t.dtype == torch.float32 for t in load_file(out / "model.safetensors").values())  # autocast, fp32 weights


def test_unknown_or_impossible_precision_is_one_line(number_corpus, tmp_path, monkeypatch):
    result = invoke(*train_args(number_corpus, tmp_path / "m", "--precision", "fp8"))
    assert result.exit_code == 2
    assert result.output.strip() == "llmcli: error: --precision 'fp8' is not fp32, bf16 or fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="bf16 needs a GPU with bfloat16"):
        check_precision("bf16", torch.device("cuda"))


# ---------------------------------------------------------------- averaging


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("avg")
    tok = train_tokenizer(["one two three four five six"] * 10, vocab_size=300)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_heads=2, n_encoder_layers=1, n_decoder_layers=1, d_ff=64,
                      max_positions=32, pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id)  # fmt: skip
    dirs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        dirs.append(checkpoint.save_model(d / f"step-{seed}", Transformer(cfg), tok, tok, {"task": "translate"}))
    return dirs


def test_average_of_copies_is_the_checkpoint_and_of_two_their_mean(two_checkpoints, tmp_path):
    a, b = two_checkpoints
    same = invoke("average", str(a), str(a), str(a), "--out", str(tmp_path / "same"), "--quiet")
    assert same.exit_code == 0, same.output
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    averaged = load_file(tmp_path / "same" / "model.safetensors")
    assert all(torch.equal(averaged[k], wa[k]) for k in wa)
    mean = invoke("average", str(a), str(b), "--out", str(tmp_path / "mean"))
    assert mean.exit_code == 0, mean.output
    averaged = load_file(tmp_path / "mean" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(averaged[k], (wa[k] + wb[k]) / 2, rtol=0, atol=1e-7)
    assert checkpoint.load_model(tmp_path / "mean").config == checkpoint.load_model(a).config


def test_average_refuses_checkpoints_of_different_models(two_checkpoints, tmp_path):
    a, _ = two_checkpoints
    other = tmp_path / "other"
    other.mkdir()
    for name in ("model.safetensors", "tokenizer.json", "generation.json"):
        (other / name).write_bytes((a / name).read_bytes())
    cfg = json.loads((a / "config.json").read_text())
    cfg["d_ff"] = 128
    (other / "config.json").write_text(json.dumps(cfg))
    result = invoke("average", str(a), str(other), "--out", str(tmp_path / "x"))
    assert result.exit_code == 2
    assert result.output.strip() == f"llmcli: error: {other}: its config differs from {a}'s; average checkpoints of one run"
