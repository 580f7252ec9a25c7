"""Training under faults: kill -9 anywhere (also inside checkpoint writes) then --resume, a full
disk while saving, a loss that turns NaN or inf, an empty corpus.

What must hold: there is always a checkpoint that loads, a resumed run ends bit for bit where an
uninterrupted one does, a failed save or a diverged loss keeps the last good checkpoint and says
so in one line, and nothing half-written is left behind.
"""

import errno
import json
import multiprocessing
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import train_args
from safetensors.torch import load_file
from typer.testing import CliRunner

from llmcli import checkpoint
from llmcli.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def one_thread():
    # 2 cores shared by many: one thread is faster here, and every run gets the same arithmetic.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def invoke(*args):
    return runner.invoke(app, list(args))


def every_step(corpus: Path, out: Path, steps: int, *extra: str) -> list[str]:
    # Without validation data --valid-every is the save interval: a checkpoint at every step.
    return train_args(corpus, out, "--max-steps", str(steps), "--valid-every", "1", *extra)


def resume_args(out: Path, steps: int, *extra: str) -> list[str]:
    return ["train", "--task", "translate", "--resume", str(out), "--max-steps", str(steps), "--valid-every", "1",
            "--quiet", *extra]  # fmt: skip


def end_state(out: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """What a run ends with: the model, the last weights, the optimizer's moments; and state.json."""
    tensors = {f"model/{k}": v for k, v in load_file(out / "model.safetensors").items()}
    for name in ("model.safetensors", "optimizer.safetensors"):
        tensors.update({f"{name}/{k}": v for k, v in load_file(out / "train_state" / name).items()})
    return tensors, json.loads((out / "train_state" / "state.json").read_text())


def assert_bit_for_bit(a: Path, b: Path) -> None:
    (ta, sa), (tb, sb) = end_state(a), end_state(b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    sa["options"].pop("out"), sb["options"].pop("out")
    assert sa == sb


def leftovers(out: Path) -> set[str]:
    """Temporary files and folders (dot-names) anywhere in a run's directory: a write in progress."""
    return {str(p.relative_to(out)) for p in out.rglob(".*")}


def assert_loadable(out: Path) -> int:
    """A checkpoint that loads: the model, every kept checkpoint, and the state to resume from. Its step."""
    checkpoint.load_model(out)
    for kept in sorted((out / "checkpoints").glob("step-*")):
        checkpoint.load_model(kept)
    state = json.loads((out / "train_state" / "state.json").read_text())
    for name in ("model.safetensors", "optimizer.safetensors"):
        checkpoint.load_weights(out / "train_state" / name)
    return state["progress"]["step"]


def one_error_line(output: str) -> str:
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmcli: error: "), output
    return lines[0]


# ---------------------------------------------------------------- a crash inside a save


class Crash(Exception):
    """Stands for the process dying in the middle of a write (the slow test below kills for real)."""


def test_a_crash_between_the_files_of_a_save_keeps_the_previous_state_whole(number_corpus, tmp_path, monkeypatch):
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    assert invoke(*every_step(number_corpus, reference, 4)).exit_code == 0
    save_weights, calls = checkpoint.save_weights, []

    def dies_at_the_third_optimizer_file(path, tensors, metadata=None):
        if path.name == "optimizer.safetensors":
            calls.append(path)
            if len(calls) == 3:  # the weights beside it are written, the moments not yet
                raise Crash
        save_weights(path, tensors, metadata)

    monkeypatch.setattr(checkpoint, "save_weights", dies_at_the_third_optimizer_file)
    assert isinstance(invoke(*every_step(number_corpus, crashed, 4)).exception, Crash)
    monkeypatch.setattr(checkpoint, "save_weights", save_weights)
    assert assert_loadable(crashed) >= 1
    resumed = invoke(*resume_args(crashed, 4))
    assert resumed.exit_code == 0, resumed.output
    assert_bit_for_bit(reference, crashed)
    assert not leftovers(crashed)


# ---------------------------------------------------------------- a full disk


def test_a_full_disk_while_saving_keeps_the_last_checkpoint_and_says_so(number_corpus, tmp_path):
    out = tmp_path / "m"

    def small_files():  # 200 kB a file: the model (130 kB) fits, its optimizer moments (260 kB) do not
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer; now write() fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    args = [a for a in train_args(number_corpus, out, "--max-steps", "3", "--valid-every", "2") if a != "--quiet"]
    proc = subprocess.run([sys.executable, "-m", "llmcli", *args], capture_output=True, timeout=300, preexec_fn=small_files,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip
    err = proc.stderr.decode()
    assert proc.returncode != 0 and "Traceback" not in err, err
    line = [ln for ln in err.splitlines() if ln.startswith("llmcli: error:")]
    assert len(line) == 1 and err.strip().endswith(line[0]), err
    assert "step 2" in line[0] and os.strerror(errno.EFBIG) in line[0], line[0]
    kept = assert_loadable(out)
    assert f"the checkpoint of step {kept} is kept" in line[0]
    assert not leftovers(out)
    resumed = invoke(*resume_args(out, 3))  # room again: the run goes on from there
    assert resumed.exit_code == 0, resumed.output


# ---------------------------------------------------------------- a loss that is not a number


def test_a_learning_rate_that_diverges_stops_at_the_step_keeping_the_last_finite_checkpoint(number_corpus, tmp_path):
    out = tmp_path / "m"
    result = invoke(*every_step(number_corpus, out, 8, "--lr", "1e30"))
    assert result.exit_code == 2, result.output
    line = one_error_line(result.output)
    step = int(re.search(r"at step (\d+)", line).group(1))
    assert re.search(r"\b(nan|inf)\b", line), line
    kept = assert_loadable(out)
    assert kept == step - 1 and f"the checkpoint of step {kept} is kept" in line
    for path in (out / "model.safetensors", out / "train_state" / "model.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(path).values()), path


def test_an_infinite_loss_is_reported_with_its_step(number_corpus, tmp_path, monkeypatch):
    from llmcli import train

    loss, calls = train._loss, []

    def infinite_at_step_3(model, batch, label_smoothing):  # one batch a step here
        value, n = loss(model, batch, label_smoothing)
        calls.append(1)
        return (value * float("inf"), n) if len(calls) == 3 else (value, n)

    monkeypatch.setattr(train, "_loss", infinite_at_step_3)
    out = tmp_path / "m"
    result = invoke(*every_step(number_corpus, out, 6))
    assert result.exit_code == 2, result.output
    line = one_error_line(result.output)
    assert "inf" in line and "at step 3" in line and "the checkpoint of step 2 is kept" in line, line
    assert assert_loadable(out) == 2


# ---------------------------------------------------------------- an empty corpus


EMPTY = [
    ("translate", "", ""),
    ("translate", "\n\n\n", "\n\n\n"),
    ("translate", " \n\t\n", "一\n二\n"),  # the source side blank: no pair to learn from
    ("translate", "\r\n\r\n", "\r\n\r\n"),
    ("generate", "", None),
    ("generate", "\n\n \n", None),
    ("qa", "\n\n", None),
]


@pytest.mark.parametrize("task, first, second", EMPTY)
def test_an_empty_corpus_is_one_line_exit_2(task, first, second, tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_bytes(first.encode())
    if task == "translate":
        b.write_bytes(second.encode())
        data = ["--src", str(a), "--tgt", str(b)]
    else:
        data = ["--text" if task == "generate" else "--data", str(a)]
    result = invoke("train", "--task", task, *data, "--out", str(tmp_path / "m"), "--vocab-size", "300")
    assert result.exit_code == 2
    assert "empty" in one_error_line(result.output)
    assert not (tmp_path / "m").exists()


def test_an_empty_validation_set_is_one_line_exit_2(number_corpus, tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n", encoding="utf-8")
    args = train_args(number_corpus, tmp_path / "m", "--valid-src", str(blank), "--valid-tgt", str(blank))
    result = invoke(*[a for a in args if a != "--quiet"])
    assert result.exit_code == 2
    assert "the validation set is empty" in one_error_line(result.output)


# ---------------------------------------------------------------- kill -9, for real, many times


def _cli_child(args: list[str], env: dict, log: str, kill_at_write: int | None) -> None:
    """`llmcli ARGS` in a process forked from a server that has imported torch already (so a start
    costs a fork, not 5 s of imports). With kill_at_write=N it kills itself (SIGKILL) at its N-th
    write: just before a temporary file is filled or just before one is renamed into place."""
    os.environ.clear()
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1), os.dup2(fd, 2)
    torch.set_num_threads(1)
    if kill_at_write is not None:
        from llmcli import checkpoint

        writes = [0]

        def killing(original):
            def wrapper(*a, **kw):
                writes[0] += 1
                if writes[0] == kill_at_write:
                    os.kill(os.getpid(), signal.SIGKILL)
                return original(*a, **kw)

            return wrapper

        checkpoint.save_file = killing(checkpoint.save_file)
        os.replace = killing(os.replace)
        os.rename = killing(os.rename)
    sys.argv = ["llmcli", *args]
    from llmcli.cli import main

    main()


class Processes:
    def __init__(self, log: Path):
        self.context = multiprocessing.get_context("forkserver")
        # torch._dynamo: the first optimizer imports it (seconds) in every process that makes one.
        preload = ["torch", "torch._dynamo", "safetensors.torch", "llmcli.cli", "llmcli.train", "llmcli.progress"]
        self.context.set_forkserver_preload(preload)
        self.log = log

    def start(self, args: list[str], kill_at_write: int | None = None):
        proc = self.context.Process(target=_cli_child, args=(args, dict(os.environ), str(self.log), kill_at_write))
        proc.start()
        return proc

    def run(self, args: list[str], kill_at_write: int | None = None) -> int:
        proc = self.start(args, kill_at_write)
        proc.join(300)
        return proc.exitcode


STEPS = 24
RANDOM_KILLS = 14  # at random moments
WRITE_KILLS = 6  # at a random one of the writes: surely inside a checkpoint write


@pytest.mark.slow
def test_kill_9_anywhere_then_resume_ends_bit_for_bit_where_an_uninterrupted_run_does(number_corpus, tmp_path):
    log = tmp_path / "children.log"
    procs = Processes(log)
    keep = ("--keep-checkpoints", "2")
    reference = tmp_path / "reference"
    assert procs.run(["--version"]) == 0  # the server is up and has imported torch: not part of the run's time
    started = time.monotonic()
    assert procs.run(every_step(number_corpus, reference, STEPS, *keep)) == 0, log.read_text()
    duration = time.monotonic() - started  # a whole run, to spread the kills over

    def next_args(out: Path) -> list[str] | None:
        state = out / "train_state" / "state.json"
        if not state.exists():  # it died before its first checkpoint (or never ran): start it again
            return every_step(number_corpus, out, STEPS, *keep)
        if json.loads(state.read_text())["progress"]["step"] == STEPS:
            return None
        return resume_args(out, STEPS, *keep)

    rng = random.Random(16)
    plan = ["time"] * RANDOM_KILLS + ["write"] * WRITE_KILLS
    rng.shuffle(plan)
    runs, out, seen = 1, tmp_path / "run1", set()
    landed = {"time": 0, "write": 0}
    in_a_write = {"time": 0, "write": 0}
    for kind in plan:
        args = next_args(out)
        if args is None:  # the run got to its end between two kills: check it, start another
            assert_bit_for_bit(reference, out)
            assert not leftovers(out)
            runs += 1
            out = tmp_path / f"run{runs}"
            args = next_args(out)
        if kind == "time":
            proc = procs.start(args)
            proc.join(rng.uniform(0, duration / 2))
            if proc.exitcode is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.join()
        else:
            proc = procs.start(args, kill_at_write=rng.randint(1, 60))
            proc.join(300)
        if proc.exitcode == 0:  # it ended before the kill came
            continue
        assert proc.exitcode == -signal.SIGKILL, log.read_text()[-2000:]
        landed[kind] += 1
        temporary = leftovers(out) - seen
        in_a_write[kind] += bool(temporary)
        seen |= temporary
        if (out / "train_state" / "state.json").exists():
            assert 0 <= assert_loadable(out) <= STEPS
    args = next_args(out)
    if args is not None:
        assert procs.run(args) == 0, log.read_text()[-2000:]
    assert_bit_for_bit(reference, out)
    assert not leftovers(out)
    assert sum(landed.values()) >= len(plan) // 2  # else the runs are too short for the test to mean much
    print(
        f"{sum(landed.values())} kills landed over {runs} runs: {landed['time']} at random moments, "
        f"{in_a_write['time']} of them inside a write (a temporary file present); {landed['write']} at a write; "
        f"an uninterrupted run takes {duration:.1f} s"
    )
