"""Hostile text input through every command that reads lines, in a real subprocess.

Each case keeps one output line per input line, in order, and an empty input line gives an
empty output line. Lines end at \\n (as `wc -l` counts them); \\r\\n is one line end; a lone \\r
is a character inside the line (written back as the two characters \\r).
"""

import re

import pytest
from conftest import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

CASES = {
    "empty_file": b"",
    "only_empty_lines": b"\n\n\n",
    "crlf": b"one\r\ntwo\r\n\r\nthree\r\n",
    "lone_cr": b"one\rtwo\nthree\r\n\rfour\n",
    "bom": b"\xef\xbb\xbfone\ntwo\n",
    "invalid_utf8_mid_line": b"one \xff\xfe two\nthree \xc3 four\n",
    "nul_bytes": b"one\x00two\n\x00\nthree\n",
    "no_final_newline": b"one\ntwo",
    "million_char_line": b"one\n" + b"seven " * 166_667 + b"\nthree\n",
    "control_chars": b"one\x01\x07\x1b[31mtwo\x7f\n\x0b\x0c\n",
    "rtl_and_combining": "שלום עולם\nمرحبا\ne\u0301 a\u0308 n\u0303\n\u202eevil\u202c\n".encode(),
    "cjk": "三十二\n一百零五\n日本語のテキスト\n한국어\n".encode(),
    "emoji_and_zwj": "👍\n👨\u200d👩\u200d👧\u200d👦 family\n🏳️\u200d🌈\n".encode(),
}


def input_lines(data: bytes) -> list[bytes]:
    """The lines as llmcli counts them: split at \\n, \\r\\n being one line end."""
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def check_aligned(data: bytes, stdout: bytes, empty_stays_empty: bool = True) -> None:
    expected = input_lines(data)
    got = stdout.decode("utf-8").split("\n")
    assert got.pop() == "", "output must end with a newline (or be empty)"
    if not expected:
        assert stdout == b""
        return
    assert len(got) == len(expected)
    for source, out in zip(expected, got):
        if empty_stays_empty and source.lstrip(b"\xef\xbb\xbf") == b"":
            assert out == "", f"empty input line gave {out!r}"


@pytest.fixture(params=sorted(CASES))
def case(request, tmp_path):
    data = CASES[request.param]
    path = tmp_path / f"{request.param}.txt"
    path.write_bytes(data)
    return request.param, data, path


def assert_clean(result):
    stderr = result.stderr.decode("utf-8", "replace")
    assert "Traceback" not in stderr, stderr
    assert result.returncode == 0, stderr


@pytest.mark.parametrize("command", ["translate", "summarize"])
def test_seq2seq_commands_keep_one_line_per_line(command, case, tiny_model):
    name, data, path = case
    result = run_cli(command, "-m", str(tiny_model), str(path), "--beam", "1", "--max-len", "8", "--quiet")
    assert_clean(result)
    check_aligned(data, result.stdout)


def test_seq2seq_stdin_keeps_one_line_per_line(case, tiny_model):
    name, data, path = case
    result = run_cli("translate", "-m", str(tiny_model), "--beam", "1", "--max-len", "8", "--quiet", input=data)
    assert_clean(result)
    check_aligned(data, result.stdout)


def test_generate_input_keeps_one_line_per_line(case, tiny_lm):
    """generate continues an empty prompt from the start of a text (tasks.generate's documented choice)."""
    name, data, path = case
    result = run_cli("generate", "-m", str(tiny_lm), "--input", str(path), "--max-new-tokens", "3", "--quiet")
    assert_clean(result)
    check_aligned(data, result.stdout, empty_stays_empty=False)


def test_eval_aligns_hypotheses_with_references(case):
    """The same hostile file as hypotheses and as references: every line matches its own."""
    name, data, path = case
    result = run_cli("eval", str(path), "--ref", str(path), "--metric", "exact")
    stderr = result.stderr.decode("utf-8", "replace")
    assert "Traceback" not in stderr, stderr
    if not input_lines(data):
        assert result.returncode == 2 and stderr.count("\n") == 1 and "is empty" in stderr, stderr
        return
    assert result.returncode == 0, stderr
    n = len(input_lines(data))
    assert re.search(rf"correct\s+{n} of {n}\n".encode(), result.stdout), result.stdout


# --- property: random line lists keep count and order ---------------------------------

line_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r\x85\u2028\u2029"), max_size=30
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(st.just(""), line_text), max_size=12))
def test_translate_keeps_count_order_and_empty_lines(lines, tiny_model, tmp_path):
    """In-process: each line alone gives the same output as in the batch, so order is kept."""
    from typer.testing import CliRunner

    from llmcli.cli import app

    path = tmp_path / "in.txt"
    path.write_bytes("".join(line + "\n" for line in lines).encode("utf-8"))
    args = ["translate", "-m", str(tiny_model), str(path), "--beam", "1", "--max-len", "6", "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = result.stdout.split("\n")
    assert out.pop() == "" or not lines
    if not lines:
        assert result.stdout == ""
        return
    assert len(out) == len(lines)
    for source, target in zip(lines, out):
        if source.strip() == "":
            assert target == ""
    # Order: the last non-empty line translated on its own gives the last output.
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].strip():
            path.write_bytes((lines[i] + "\n").encode("utf-8"))
            alone = CliRunner().invoke(app, args)
            assert alone.stdout == out[i] + "\n"
            break
