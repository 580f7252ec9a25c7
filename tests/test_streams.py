"""Streams in a real subprocess: huge inputs in bounded memory, signals, pipes, full disks."""

import os
import resource
import signal
import subprocess
import sys
import time

import pytest
from conftest import run_cli, sigint_default

ARGS = ["--beam", "1", "--max-len", "6", "--quiet"]
WORDS = ["one", "two", "three", "forty five", "", "seven hundred"]


def numbers_file(path, n):
    path.write_text("".join(WORDS[i % len(WORDS)] + "\n" for i in range(n)), encoding="utf-8")
    return path


def start(*args, stdin=None, stdout=subprocess.PIPE, preexec_fn=None):
    def prepare():
        sigint_default()
        if preexec_fn is not None:
            preexec_fn()

    return subprocess.Popen([sys.executable, "-m", "llmcli", *args], stdin=stdin, stdout=stdout,
                            stderr=subprocess.PIPE, preexec_fn=prepare)  # fmt: skip


def wait_until(condition, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never came true"
        time.sleep(0.05)


def translate_lines(tiny_model, tmp_path, n):
    source = numbers_file(tmp_path / "in.txt", n)
    out = tmp_path / "out.txt"
    with open(out, "wb") as f:
        proc = start("translate", "-m", str(tiny_model), str(source), *ARGS, stdout=f)
        _, stderr = proc.communicate(timeout=3000)
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert proc.returncode == 0, stderr.decode()
    lines = out.read_bytes().split(b"\n")
    assert lines.pop() == b""
    assert len(lines) == n
    assert all(lines[i] == b"" for i in range(4, n, len(WORDS)))  # empty stays empty, in place
    return usage.ru_maxrss * 1024  # Linux reports KiB


def test_100k_lines_in_bounded_memory(tiny_model, tmp_path):
    peak = translate_lines(tiny_model, tmp_path, 100_000)
    assert peak < 2 * 1024**3, f"peak RSS {peak / 1024**2:.0f} MiB"


@pytest.mark.slow
def test_1m_lines_in_bounded_memory(tiny_model, tmp_path):
    peak = translate_lines(tiny_model, tmp_path, 1_000_000)
    assert peak < 2 * 1024**3, f"peak RSS {peak / 1024**2:.0f} MiB"


def test_head_1_ends_quietly(tiny_model, tmp_path):
    source = numbers_file(tmp_path / "in.txt", 20_000)
    proc = start("translate", "-m", str(tiny_model), str(source), *ARGS)
    first = proc.stdout.readline()
    proc.stdout.close()  # as `head -1` does
    _, stderr = proc.communicate(timeout=120)
    assert first.endswith(b"\n")
    assert b"Traceback" not in stderr and b"Error" not in stderr, stderr.decode()
    assert proc.returncode in (0, -signal.SIGPIPE)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_run_writes_only_whole_lines(signum, code, tiny_model, tmp_path):
    source = numbers_file(tmp_path / "in.txt", 200_000)
    out = tmp_path / "out.txt"
    with open(out, "wb") as f:
        proc = start("translate", "-m", str(tiny_model), str(source), *ARGS, stdout=f)
        wait_until(lambda: out.stat().st_size > 0)  # mid-run: output has begun
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr.decode()
    assert b"Traceback" not in stderr, stderr.decode()
    data = out.read_bytes()
    assert data.endswith(b"\n")
    assert 0 < data.count(b"\n") < 200_000


def _writing_to(pid, directory) -> bool:
    fds = f"/proc/{pid}/fd"
    try:
        return any(os.readlink(os.path.join(fds, fd)).startswith(str(directory)) for fd in os.listdir(fds))
    except OSError:
        return False


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_output_file_never_half_written(signum, tiny_model, tmp_path):
    source = numbers_file(tmp_path / "in.txt", 200_000)
    target_dir = tmp_path / "out"
    target_dir.mkdir()
    target = target_dir / "out.txt"
    target.write_text("old\n")
    proc = start("translate", "-m", str(tiny_model), str(source), *ARGS, "--output", str(target))
    wait_until(lambda: _writing_to(proc.pid, target_dir))  # the temporary output is open
    time.sleep(0.5)  # and being written
    proc.send_signal(signum)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert target.read_text() == "old\n"
    assert os.listdir(target_dir) == ["out.txt"], "a temporary file was left behind"


def test_output_file_complete_on_success(tiny_model, tmp_path):
    source = numbers_file(tmp_path / "in.txt", 12)
    target = tmp_path / "out.txt"
    target.write_text("old\n")
    result = run_cli("translate", "-m", str(tiny_model), str(source), *ARGS, "--output", str(target))
    assert result.returncode == 0, result.stderr.decode()
    assert target.read_text().count("\n") == 12
    assert sorted(os.listdir(tmp_path)) == ["in.txt", "out.txt"]


@pytest.mark.parametrize("how", ["devnull", "closed_pipe", "fd_closed"])
def test_empty_or_closed_stdin(how, tiny_model):
    if how == "devnull":
        proc = start("translate", "-m", str(tiny_model), *ARGS, stdin=subprocess.DEVNULL)
    elif how == "closed_pipe":
        proc = start("translate", "-m", str(tiny_model), *ARGS, stdin=subprocess.PIPE)
        proc.stdin.close()  # the writer went away before writing anything
        proc.stdin = None
    else:  # `llmcli translate <&-`
        proc = start("translate", "-m", str(tiny_model), *ARGS, preexec_fn=lambda: os.close(0))
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr.decode()
    assert stdout == b""
    assert b"Traceback" not in stderr


def _one_line_error(proc, stderr):
    text = stderr.decode("utf-8", "replace")
    assert proc.returncode not in (0, None), text
    assert proc.returncode > 0, f"killed by signal {-proc.returncode}"
    assert "Traceback" not in text and "Exception ignored" not in text, text
    assert text.count("\n") == 1 and text.startswith("llmcli: error:"), text


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_stdout_on_full_device(tiny_model, tmp_path):
    source = numbers_file(tmp_path / "in.txt", 5_000)
    with open("/dev/full", "wb") as full:
        proc = start("translate", "-m", str(tiny_model), str(source), *ARGS, stdout=full)
        _, stderr = proc.communicate(timeout=300)
    _one_line_error(proc, stderr)


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


@pytest.mark.parametrize("to", ["stdout", "output"])
def test_file_size_limit(to, tiny_model, tmp_path):
    source = numbers_file(tmp_path / "in.txt", 20_000)
    out = tmp_path / "out.txt"
    if to == "stdout":
        with open(out, "wb") as f:
            proc = start("translate", "-m", str(tiny_model), str(source), *ARGS, stdout=f, preexec_fn=_limit_file_size)
            _, stderr = proc.communicate(timeout=300)
    else:
        out.write_text("old\n")
        proc = start("translate", "-m", str(tiny_model), str(source), *ARGS, "--output", str(out),
                     preexec_fn=_limit_file_size)  # fmt: skip
        _, stderr = proc.communicate(timeout=300)
        assert out.read_text() == "old\n"
        assert sorted(os.listdir(tmp_path)) == ["in.txt", "out.txt"]
    _one_line_error(proc, stderr)
