"""`llmcli models`, stored defaults and -m left out, through the CLI, in an isolated config
dir and caches (conftest's isolated_user_state)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmcli.cli import app
from llmcli.io import cache_root

NUMBERS = "forty-two\n\nninety thousand\nseven hundred one\n"


def invoke(*args: str, input: str | None = None):
    return CliRunner().invoke(app, list(args), input=input)


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("llmcli: error: "), result.stderr
    return line


def config_dir() -> Path:
    return Path(os.environ["XDG_CONFIG_HOME"]) / "llmcli"


def translate(*args: str) -> str:
    result = invoke("translate", "--beam", "1", "-q", *args, input=NUMBERS)
    assert result.exit_code == 0, result.output
    return result.stdout


def tiny_hf_llama(d: Path):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(d)
    return model


def hub_layout(model_id: str, src: Path) -> Path:
    """The standard Hugging Face cache layout: models--org--name/{refs/main, snapshots/<commit>/}."""
    repo = Path(os.environ["HF_HOME"]) / "hub" / ("models--" + model_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(src, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def place(model: Path, *parts: str) -> Path:
    target = cache_root().joinpath(*parts)
    shutil.copytree(model, target)
    return target


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf-llama")
    return d, tiny_hf_llama(d).num_parameters()


# ---------------------------------------------------------------- llmcli models


def test_models_lists_llmcli_models_in_the_cache_and_supported_hugging_face_ids(tiny_model, hf_llama, tmp_path):
    mine = place(tiny_model, "mine", "tiny")
    demo = place(tiny_model, "demo-en-zh-numbers", "model")
    hub_layout("tiny-org/tiny-llama", hf_llama[0])
    unsupported = tmp_path / "mamba"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}))
    hub_layout("other-org/tiny-mamba", unsupported)

    result = invoke("models", "--json")
    assert result.exit_code == 0, result.output
    rows = {row["model"]: row for row in map(json.loads, result.stdout.splitlines())}
    assert set(rows) == {str(mine), str(demo), "tiny-org/tiny-llama"}  # not the mamba, nor train_state/
    facts = json.loads(invoke("info", "-m", str(tiny_model), "--json").stdout)
    assert rows[str(mine)]["kind"] == "cache" and rows[str(demo)]["kind"] == "demo"
    for row in rows[str(mine)], rows[str(demo)]:
        assert row["architecture"] == "encoder-decoder" and row["task"] == "translate"
        assert row["tasks"][0] == "translate" and set(row["tasks"]) == set(facts["tasks"])
        assert row["parameters"] == facts["parameters"]
    hf = rows["tiny-org/tiny-llama"]
    assert hf["kind"] == "hf-cache" and hf["architecture"] == "decoder-only" and "generate" in hf["tasks"]
    assert hf["parameters"] == hf_llama[1]

    table = invoke("models")
    assert table.exit_code == 0 and table.stderr == ""
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["kind", "tasks", "architecture", "parameters", "default", "for", "model"]
    assert len(lines) == 4 and any(line.startswith("hf-cache") and line.endswith("tiny-org/tiny-llama") for line in lines)


def test_converted_models_are_listed(hf_llama):
    from llmcli import hub

    hub_layout("tiny-org/tiny-llama", hf_llama[0])
    # converting needs a tokenizer the tiny model lacks: list a conversion's directory as hub.py names it
    target = hub.converted_path(hub.find_in_cache("tiny-org/tiny-llama"))
    target.mkdir(parents=True)
    (target / "config.json").write_text(json.dumps({"architecture": "decoder-only"}))
    shutil.copy(hf_llama[0] / "model.safetensors", target / "model.safetensors")
    rows = [json.loads(line) for line in invoke("models", "--json").stdout.splitlines()]
    converted = [row for row in rows if row["kind"] == "converted"]
    assert [row["model"] for row in converted] == [str(target)] and converted[0]["parameters"] == hf_llama[1]


def test_no_models_is_a_hint_on_stderr_and_nothing_on_stdout():
    result = invoke("models")
    assert result.exit_code == 0 and result.stdout == ""
    assert "llmcli demo" in result.stderr


# ---------------------------------------------------------------- llmcli models default


def test_a_default_round_trips_as_an_absolute_path(tiny_model, monkeypatch):
    monkeypatch.chdir(tiny_model.parent)
    result = invoke("models", "default", "translate", tiny_model.name)
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and str(tiny_model) in result.stderr
    assert json.loads((config_dir() / "defaults.json").read_text()) == {"models": {"translate": str(tiny_model)}}
    shown = invoke("models", "default", "translate")
    assert shown.exit_code == 0 and shown.stdout == f"{tiny_model}\n"
    assert invoke("models", "default").stdout == f"translate\t{tiny_model}\n"
    rows = [json.loads(line) for line in invoke("models", "--json").stdout.splitlines()]
    assert [(r["model"], r["kind"], r["default_for"]) for r in rows] == [(str(tiny_model), "default", ["translate"])]

    forgot = invoke("models", "default", "translate", "--unset")
    assert forgot.exit_code == 0, forgot.output
    unset = invoke("models", "default", "translate")
    assert unset.exit_code == 1 and unset.stdout == "" and "llmcli models default translate MODEL" in unset.stderr


def test_a_hugging_face_id_in_the_cache_can_be_a_default(hf_llama):
    hub_layout("tiny-org/tiny-llama", hf_llama[0])
    assert invoke("models", "default", "generate", "tiny-org/tiny-llama").exit_code == 0
    assert invoke("models", "default", "generate").stdout == "tiny-org/tiny-llama\n"
    rows = [json.loads(line) for line in invoke("models", "--json").stdout.splitlines()]
    assert [r["default_for"] for r in rows if r["model"] == "tiny-org/tiny-llama"] == [["generate"]]


def test_translate_without_m_uses_the_default_and_llmcli_model_overrides_it(tiny_model, tmp_path, monkeypatch):
    expected = translate("-m", str(tiny_model))
    assert len(expected.splitlines()) == 4
    assert invoke("models", "default", "translate", str(tiny_model)).exit_code == 0
    assert translate() == expected

    missing = tmp_path / "from-the-environment"
    monkeypatch.setenv("LLMCLI_MODEL", str(missing))
    line = one_line_error(invoke("translate", input=NUMBERS))
    assert str(missing) in line
    assert "LLMCLI_MODEL" in invoke("models", "default", "translate").stderr
    assert translate("-m", str(tiny_model)) == expected  # -m before everything


def test_translate_falls_back_to_the_demo_model_and_says_so(tiny_model):
    expected = translate("-m", str(tiny_model))
    place(tiny_model, "demo-en-zh-numbers", "model")
    result = invoke("translate", "--beam", "1", input=NUMBERS)
    assert result.exit_code == 0, result.output
    assert result.stdout == expected
    assert "llmcli: using the demo model (English number words -> Chinese numerals)" in result.stderr
    assert "llmcli models default translate MODEL" in result.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["translate"], "llmcli demo"),
        (["summarize"], "llmcli models default summarize MODEL"),
        (["generate", "--input", "-"], "LLMCLI_MODEL"),
        (["chat"], "-m MODEL"),
        (["info"], "LLMCLI_MODEL"),
    ],
)
def test_without_any_model_one_line_says_how_to_get_one(args, says):
    line = one_line_error(invoke(*args, input="hello\n"))
    assert says in line


def test_a_default_that_is_gone_is_one_line(tiny_model, tmp_path):
    copy = shutil.copytree(tiny_model, tmp_path / "soon-gone")
    assert invoke("models", "default", "translate", str(copy)).exit_code == 0
    shutil.rmtree(copy)
    line = one_line_error(invoke("translate", input=NUMBERS))
    assert "default model for translate" in line and "gone" in line


# ---------------------------------------------------------------- bad input: one line, exit 2


def test_a_config_dir_that_is_not_writable_is_one_line(tiny_model, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(blocker))  # llmcli/ cannot be made inside a file
    line = one_line_error(invoke("models", "default", "translate", str(tiny_model)))
    assert "cannot write" in line and str(blocker) in line


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes through permissions")
def test_a_read_only_config_dir_is_one_line(tiny_model):
    config_dir().mkdir(parents=True)
    config_dir().chmod(0o500)
    try:
        line = one_line_error(invoke("models", "default", "translate", str(tiny_model)))
    finally:
        config_dir().chmod(0o700)
    assert "cannot write" in line


@pytest.mark.parametrize(
    "args",
    [
        ["models", "default", "translation", "x"],
        ["models", "default", "translation"],
        ["models", "default", "translate", "no/such-model-here"],
        ["models", "default", "translate", "./no-such-dir"],
    ],
)
def test_an_unknown_task_or_model_is_one_line(args):
    one_line_error(invoke(*args))
    assert not (config_dir() / "defaults.json").exists()


def test_a_corrupt_defaults_file_is_one_line():
    config_dir().mkdir(parents=True)
    (config_dir() / "defaults.json").write_text("{not json")
    line = one_line_error(invoke("translate", input=NUMBERS))
    assert "defaults.json" in line and "not valid JSON" in line


# ---------------------------------------------------------------- plumbing


def test_showing_or_storing_a_default_does_not_import_torch():
    code = "import sys, llmcli.cli, llmcli.models; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_help_says_where_the_model_comes_from_without_m():
    assert "LLMCLI_MODEL" in invoke("translate", "--help").stdout
    assert "default" in invoke("models", "--help").stdout
