"""Ensembles: `-m A -m B` decodes the mean of the models' probabilities; `llmcli train --ensemble N`
trains N models side by side into one directory that translate decodes whole, and resumes them."""

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors
import torch
from conftest import TINY_FIELDS, train_args
from typer.testing import CliRunner

from llmcli import checkpoint
from llmcli.cli import app
from llmcli.config import ModelConfig
from llmcli.ensemble import Ensemble
from llmcli.model import Transformer
from llmcli.train import TrainOptions
from llmcli.train_ensemble import auto_size


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def translate(*args):
    return invoke("translate", "--quiet", *args)


def test_a_model_with_itself_translates_as_the_model_alone(tiny_model, number_corpus, tmp_path):
    source = number_corpus / "valid.en"
    alone = translate("-m", tiny_model, source, "--beam", "4")
    assert alone.exit_code == 0, alone.output
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    together = translate("-m", tiny_model, "-m", copy, source, "--beam", "4")
    assert together.exit_code == 0, together.output
    assert together.stdout == alone.stdout
    assert len(together.stdout.splitlines()) == len(source.read_text().splitlines())


def test_a_step_is_the_log_of_the_members_mean_probability():
    cfg = ModelConfig(architecture="encoder-decoder", vocab_size=50, **TINY_FIELDS)
    members = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        members.append(Transformer(cfg).eval())
    ensemble = Ensemble(members)
    src = torch.randint(3, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    tokens = torch.full((2, 1), cfg.start_id)
    with torch.inference_mode():
        got = ensemble.step(tokens, ensemble.new_cache(2, ensemble.encode(src, mask), mask))
        probs = [torch.softmax(m.step(tokens, m.new_cache(2, m.encode(src, mask), mask)).float(), -1) for m in members]
    expected = torch.log(sum(probs) / 3)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(got.exp().sum(-1), torch.ones(2), atol=1e-5)  # a distribution
    assert not torch.allclose(got, probs[0].log(), atol=1e-3)  # not the first member's alone


def _swap_two_tokens(model_dir):
    path = model_dir / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    a, b = list(vocab)[-2:]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(data), encoding="utf-8")


def test_models_of_different_tokenizers_are_refused_in_one_line(tiny_model, number_corpus, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    _swap_two_tokens(other)  # the same size, other ids
    result = translate("-m", tiny_model, "-m", other, number_corpus / "valid.en")
    assert result.exit_code == 2
    assert (
        result.output.strip()
        == f"llmcli: error: {other}: its tokenizer differs from {tiny_model}'s; an ensemble's models share them"
    )


def test_a_missing_member_is_one_line(tiny_model, number_corpus, tmp_path):
    result = translate("-m", tiny_model, "-m", tmp_path / "nowhere", number_corpus / "valid.en")
    assert result.exit_code == 2
    assert result.output.strip() == f"llmcli: error: {tmp_path / 'nowhere'}: no such model directory"


def _ensemble_dir(tiny_model, tmp_path, members=("members/1", "members/2")):
    out = tmp_path / "ens"
    for name in members:
        shutil.copytree(tiny_model, out / name)
    checkpoint.write_ensemble(out, list(members))
    return out


def test_an_ensemble_directory_translates_whole_and_other_commands_name_a_member(tiny_model, number_corpus, tmp_path):
    out = _ensemble_dir(tiny_model, tmp_path)
    alone = translate("-m", tiny_model, number_corpus / "valid.en")
    whole = translate("-m", out, number_corpus / "valid.en")
    assert whole.exit_code == 0, whole.output
    assert whole.stdout == alone.stdout
    info = invoke("info", "-m", out, "--json")
    assert info.exit_code == 0, info.output
    facts = json.loads(info.stdout)
    assert facts["members"] == 2
    averaged = invoke("average", out, out / "members" / "1", "-o", tmp_path / "avg")
    assert averaged.exit_code == 2
    assert f"{out} is an ensemble of 2 models (ensemble.json)" in averaged.output
    assert "Traceback" not in averaged.output


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not an llmcli ensemble file"),
        ('{"members": []}', "not an llmcli ensemble file"),
        ('{"members": ["../elsewhere"]}', "is outside the ensemble directory"),
    ],
)
def test_a_broken_ensemble_file_is_one_line(tmp_path, number_corpus, content, message):
    out = tmp_path / "ens"
    out.mkdir()
    (out / "ensemble.json").write_text(content)
    result = translate("-m", out, number_corpus / "valid.en")
    assert result.exit_code == 2
    assert result.output.startswith("llmcli: error: ") and message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_auto_trains_two_models_only_for_budgeted_translation_on_two_cpu_threads(tmp_path):
    def size(threads=2, **fields):
        opts = TrainOptions(**{"task": "translate", "out": str(tmp_path), "max_minutes": 30.0, "device": "cpu", **fields})
        return auto_size(opts, threads)[0]

    assert size() == 2
    assert size(threads=16) == 2
    assert size(threads=1) == 1
    assert size(max_minutes=None) == 1
    assert size(task="generate") == 1
    assert size(task="summarize") == 1


def _state(member):
    return json.loads((member / "train_state" / "state.json").read_text())


def test_train_ensemble_writes_members_of_one_tokenizer_and_resumes_them_all(number_corpus, tmp_path):
    out = tmp_path / "ens"
    valid = ("--valid-src", number_corpus / "valid.en", "--valid-tgt", number_corpus / "valid.zh")
    result = invoke(*train_args(number_corpus, out, "--ensemble", "2", "--max-steps", "4", "--seed", "5", *valid))
    assert result.exit_code == 0, result.output
    members = checkpoint.ensemble_members(out)
    assert members == [out / "members" / "1", out / "members" / "2"]
    assert [_state(m)["options"]["seed"] for m in members] == [5, 6]
    assert [_state(m)["progress"]["step"] for m in members] == [4, 4]
    one, two = ((m / "tokenizer.json").read_bytes() for m in members)
    assert one == two
    assert (members[0] / "model.safetensors").read_bytes() != (members[1] / "model.safetensors").read_bytes()
    assert not (out / "members" / ".shared-tokenizer").exists()  # the members' copies are what is kept
    assert translate("-m", out, number_corpus / "test.en").exit_code == 0
    # --resume DIR needs no --task: the run's own
    resumed = invoke("train", "--resume", out, "--max-steps", "6", "--quiet")
    assert resumed.exit_code == 0, resumed.output
    assert [_state(m)["progress"]["step"] for m in members] == [6, 6]
    again = invoke(*train_args(number_corpus, out, "--ensemble", "2", "--max-steps", "4"))
    assert again.exit_code == 2 and "--resume" in again.output


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--ensemble", "0"), "--ensemble must be at least 1"),
        (("--ensemble", "2", "--nproc", "2"), "leave out --nproc"),
    ],
)
def test_bad_ensemble_options_are_one_line(number_corpus, tmp_path, extra, message):
    result = invoke(*train_args(number_corpus, tmp_path / "m", *extra))
    assert result.exit_code == 2
    assert message in result.output


def test_a_decoder_only_ensemble_is_refused(number_corpus, tmp_path):
    result = invoke("train", "--task", "generate", "--text", number_corpus / "train.en", "--out", tmp_path / "g",
                    "--ensemble", "2", "--quiet")  # fmt: skip
    assert result.exit_code == 2
    assert "ensembles decode encoder-decoders" in result.output
    assert not (tmp_path / "g").exists()


def sigint_default():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_ensemble_training(number_corpus, out):
    """`llmcli train --ensemble 2` in a process of its own, returned once its members train."""
    args = [a for a in train_args(number_corpus, out, "--ensemble", "2", "--max-steps", "100000") if a != "--quiet"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmcli", *args], stderr=subprocess.PIPE, stdout=subprocess.PIPE, preexec_fn=sigint_default
    )
    deadline = time.monotonic() + 120
    seen = b""
    while b"parameters" not in seen and time.monotonic() < deadline:
        seen += proc.stderr.readline()
    time.sleep(2)  # a few steps in
    return proc


def test_ctrl_c_stops_every_member_resumably(number_corpus, tmp_path):
    out = tmp_path / "ens"
    proc = _start_ensemble_training(number_corpus, out)
    proc.send_signal(signal.SIGINT)  # to the parent alone: it passes it on
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert b"Traceback" not in err
    assert f"resume the whole ensemble with: llmcli train --resume {out}".encode() in err
    steps = [_state(m)["progress"]["step"] for m in checkpoint.ensemble_members(out)]
    assert all(step >= 1 for step in steps)
    resumed = invoke("train", "--resume", out, "--max-steps", str(max(steps) + 2), "--quiet")
    assert resumed.exit_code == 0, resumed.output
    assert [_state(m)["progress"]["step"] for m in checkpoint.ensemble_members(out)] == [max(steps) + 2] * 2


def _children(pid):
    """(pid, state letter) of the processes whose parent is `pid`, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it exited meanwhile
            continue
        if int(fields[1]) == pid:
            found.append((int(stat.parent.name), fields[0]))
    return found


def _wait_for(condition, seconds=60):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)
    return condition()


def _alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_members_of_a_killed_parent_save_and_stop(number_corpus, tmp_path):
    out = tmp_path / "ens"
    proc = _start_ensemble_training(number_corpus, out)
    members = [pid for pid, _ in _children(proc.pid) if (Path(f"/proc/{pid}/cmdline").read_bytes().find(b"spawn") >= 0)]
    assert len(members) == 2
    proc.kill()  # SIGKILL: the parent can pass nothing on
    try:
        proc.communicate(timeout=60)
        assert _wait_for(lambda: not any(_alive(pid) for pid in members)), "members still training after their parent died"
    finally:  # no orphans left to slow the tests after, whatever happened
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    steps = [_state(m)["progress"]["step"] for m in checkpoint.ensemble_members(out)]
    assert all(step >= 1 for step in steps)
    resumed = invoke("train", "--resume", out, "--max-steps", str(max(steps) + 2), "--quiet")
    assert resumed.exit_code == 0, resumed.output


def test_an_ensemble_directory_can_be_the_stored_default(tiny_model, number_corpus, tmp_path):
    out = _ensemble_dir(tiny_model, tmp_path)
    assert invoke("models", "default", "translate", out).exit_code == 0
    assert translate(number_corpus / "valid.en").stdout == translate("-m", tiny_model, number_corpus / "valid.en").stdout
    listed = [json.loads(line) for line in invoke("models", "--json").stdout.splitlines()]
    entry = next(e for e in listed if e["model"] == str(out.resolve()))
    with safetensors.safe_open(Path(tiny_model) / "model.safetensors", "pt") as f:
        one = sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    assert (entry["members"], entry["default_for"], entry["parameters"]) == (2, ["translate"], 2 * one)
    assert "encoder-decoder x2" in invoke("models").stdout
