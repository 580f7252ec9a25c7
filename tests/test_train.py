import copy
import dataclasses
import json
import math
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import typer
from conftest import TINY_CONFIG, TINY_FIELDS, run_cli, set_args, sigint_default, train_args
from typer.testing import CliRunner

from llmcli.cli import app
from llmcli.config import PRESETS
from llmcli.data import make_batches
from llmcli.device import cpu_has_bf16
from llmcli.errors import UserError
from llmcli.train import POST_NORM_LR, PRESET_LR, TrainOptions, _chosen_defaults, default_lr, learning_rate

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(args))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_is_bit_for_bit(number_corpus, tmp_path, precision):
    if precision == "bf16" and not cpu_has_bf16():
        pytest.skip("this CPU has no avx512_bf16 or amx_bf16")
    a, b = tmp_path / "A", tmp_path / "B"
    # Dropout is on (0.1 in TINY_CONFIG), so this also checks the RNG state is restored. Raising
    # --max-steps moves the default schedule's end (linear decays to it): inverse_sqrt does not depend on it.
    # bf16 is autocast over fp32 master weights and AdamW state, all of which the save keeps exactly.
    common = ("--schedule", "inverse_sqrt", "--precision", precision)
    assert invoke(*train_args(number_corpus, a, "--max-steps", "12", *common)).exit_code == 0
    assert invoke(*train_args(number_corpus, b, "--max-steps", "6", *common)).exit_code == 0
    resumed = invoke("train", "--task", "translate", "--resume", str(b), "--max-steps", "12", "--quiet")
    assert resumed.exit_code == 0, resumed.output
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    state = json.loads((b / "train_state" / "state.json").read_text())
    assert state["progress"]["step"] == 12


@pytest.mark.parametrize(
    "flags, d_model, chosen, why",
    [({"avx512f", "avx512_bf16"}, 256, "bf16", "this CPU has avx512_bf16"), ({"amx_bf16"}, 512, "bf16", "this CPU has amx_bf16"),
     ({"avx2"}, 256, "fp32", "this CPU has no avx512_bf16"), ({"avx512_bf16"}, 128, "fp32", "d_model 128: below 256")],
)  # fmt: skip
def test_precision_left_unset_is_bf16_where_the_cpu_has_it(number_corpus, tmp_path, monkeypatch, flags, d_model, chosen, why):
    monkeypatch.setattr("llmcli.device.cpu_flags", lambda: flags)
    out = tmp_path / "m"
    args = [a for a in train_args(number_corpus, out, "--max-steps", "2", "--device", "cpu", "--set", f"d_model={d_model}")
            if a != "--quiet"]  # fmt: skip
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert f"chose {chosen}{' autocast' if chosen == 'bf16' else ''} ({why}" in result.output
    assert json.loads((out / "train_state" / "state.json").read_text())["options"]["precision"] == chosen
    # the run's choice is kept on resume, on any machine
    monkeypatch.setattr("llmcli.device.cpu_flags", lambda: {"avx2"} if chosen == "bf16" else {"avx512_bf16"})
    assert invoke("train", "--task", "translate", "--resume", str(out), "--max-steps", "3", "--quiet").exit_code == 0
    assert json.loads((out / "train_state" / "state.json").read_text())["options"]["precision"] == chosen


def test_resume_of_finished_run_says_what_to_do(number_corpus, tmp_path):
    out = tmp_path / "m"
    assert invoke(*train_args(number_corpus, out, "--max-steps", "2")).exit_code == 0
    again = invoke("train", "--task", "translate", "--resume", str(out), "--max-steps", "2")
    assert again.exit_code == 2
    assert "raise --max-steps" in again.output


def test_training_lowers_validation_loss_and_keeps_best(number_corpus, tmp_path):
    out = tmp_path / "m"
    args = train_args(
        number_corpus,
        out,
        "--max-steps",
        "20",
        "--valid-every",
        "10",
        "--valid-src",
        str(number_corpus / "valid.en"),
        "--valid-tgt",
        str(number_corpus / "valid.zh"),
    )
    result = invoke(*[a for a in args if a != "--quiet"])  # the validation lines are what we read
    assert result.exit_code == 0, result.output
    losses = [
        float(line.split("validation loss ")[1].split(",")[0]) for line in result.output.splitlines() if line.startswith("step ")
    ]
    assert len(losses) == 2 and losses[1] < losses[0]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation.json"):
        assert (out / name).is_file()


def test_existing_run_is_not_overwritten(number_corpus, tmp_path):
    out = tmp_path / "m"
    assert invoke(*train_args(number_corpus, out, "--max-steps", "1")).exit_code == 0
    before = (out / "model.safetensors").read_bytes()
    again = invoke(*train_args(number_corpus, out, "--max-steps", "1"))
    assert again.exit_code == 2 and "--resume" in again.output
    assert (out / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: (d / "train.zh").write_text("一\n二\n", encoding="utf-8"), "must be line-aligned"),
        (lambda d: [(d / f).write_text("", encoding="utf-8") for f in ("train.en", "train.zh")], "empty"),
        (lambda d: (d / "train.en").unlink(), "no such file"),
    ],
)
def test_bad_training_data_is_one_line_exit_2(number_corpus, tmp_path, mutate, message):
    data = tmp_path / "data"
    data.mkdir()
    for f in ("train.en", "train.zh"):
        (data / f).write_bytes((number_corpus / f).read_bytes())
    mutate(data)
    result = run_cli(*train_args(data, tmp_path / "out", "--max-steps", "1"))
    assert result.returncode == 2
    err = result.stderr.decode()
    assert err.startswith("llmcli: error:") and message in err and len(err.strip().splitlines()) == 1
    assert b"Traceback" not in result.stderr


def test_ctrl_c_saves_a_resumable_checkpoint_and_exits_130(number_corpus, tmp_path):
    out = tmp_path / "m"
    args = [a for a in train_args(number_corpus, out, "--max-steps", "100000") if a != "--quiet"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmcli", *args], stderr=subprocess.PIPE, stdout=subprocess.PIPE, preexec_fn=sigint_default
    )
    deadline = time.monotonic() + 120
    seen = b""
    while b"parameters" not in seen and time.monotonic() < deadline:
        seen += proc.stderr.readline()
    time.sleep(1.5)  # a few steps in
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert b"Traceback" not in err
    assert b"resume with: llmcli train --resume" in err
    state = json.loads((out / "train_state" / "state.json").read_text())
    assert state["progress"]["step"] >= 1
    resumed = invoke(
        "train", "--task", "translate", "--resume", str(out), "--max-steps", str(state["progress"]["step"] + 2), "--quiet"
    )
    assert resumed.exit_code == 0, resumed.output


def test_decoder_only_language_model_trains_and_generates(tiny_lm):
    gen = invoke("generate", "-m", str(tiny_lm), "the cat", "--greedy", "--max-new-tokens", "8")
    assert gen.exit_code == 0, gen.output
    assert gen.output.endswith("\n") and gen.output.count("\n") == 1
    # 40 steps on a repetitive corpus: at least 5x better than chance (perplexity = vocabulary size, 300).
    text = tiny_lm.parent / "corpus.txt"
    ppl = invoke("eval", "--metric", "perplexity", "-m", str(tiny_lm), str(text), "--json")
    assert ppl.exit_code == 0, ppl.output
    assert json.loads(ppl.output)["score"] < 60
    info = invoke("info", "-m", str(tiny_lm), "--json")
    assert json.loads(info.output)["architecture"] == "decoder-only"


def test_qa_trains_from_jsonl(tmp_path):
    data = tmp_path / "qa.jsonl"
    rows = [{"question": f"what is item {i}?", "context": f"item {i} is a {c}.", "answer": c}
            for i, c in enumerate(["cat", "dog", "cow"] * 20)]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "qa"
    result = invoke("train", "--task", "qa", "--data", str(data), "--out", str(out), "--vocab-size", "300",
                    "--batch-tokens", "512", "--max-steps", "5", "--quiet", *TINY_CONFIG)  # fmt: skip
    assert result.exit_code == 0, result.output
    answered = runner.invoke(
        app, ["qa", "-m", str(out), "--beam", "1"], input=json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n"
    )
    assert answered.exit_code == 0, answered.output
    assert len(answered.output.splitlines()) == 2  # blank JSONL lines are not questions


def test_batches_depend_only_on_seed_and_epoch():
    lengths = [5, 9, 3, 12, 7, 7, 2, 30, 4, 8] * 10
    a = make_batches(lengths, 64, seed=3, epoch=1)
    assert a == make_batches(lengths, 64, seed=3, epoch=1)
    assert a != make_batches(lengths, 64, seed=3, epoch=2)
    assert sorted(i for b in a for i in b) == list(range(len(lengths)))
    assert all(max(lengths[i] for i in b) * len(b) <= 64 or len(b) == 1 for b in a)


def test_learning_rate_schedule():
    opts = TrainOptions(task="translate", out="x", lr=1e-3, warmup_steps=100, max_steps=1000, schedule="inverse_sqrt")
    assert learning_rate(50, opts) == pytest.approx(5e-4)
    assert learning_rate(100, opts) == pytest.approx(1e-3)
    assert learning_rate(400, opts) == pytest.approx(5e-4)  # inverse square root
    cosine = dataclasses.replace(opts, schedule="cosine")
    assert learning_rate(1000, cosine) == pytest.approx(1e-4)
    linear = dataclasses.replace(opts, schedule="linear")
    assert learning_rate(100, linear) == pytest.approx(1e-3)
    assert learning_rate(550, linear) == pytest.approx(5e-4)
    assert learning_rate(1000, linear) == 0.0
    # A time budget's horizon ends the decay before max_steps; it never extends past it.
    assert learning_rate(300, linear, horizon=500) == pytest.approx(1e-3 * (1 - 200 / 400))
    assert learning_rate(500, linear, horizon=500) == 0.0
    assert learning_rate(550, linear, horizon=5000) == pytest.approx(5e-4)
    # The default warmup: 400 steps, or a tenth of a shorter run.
    default = TrainOptions(task="translate", out="x", lr=1e-3, max_steps=100000)
    assert learning_rate(200, default) == pytest.approx(5e-4)
    assert learning_rate(20, default, horizon=400) == pytest.approx(5e-4)


def test_post_norm_schedule_goes_by_the_length_of_the_run():
    opts = TrainOptions(task="translate", out="x", lr=2e-3, max_steps=100000, schedule_rule="post-norm")
    # 1,300 steps or more (30 one-thread minutes): 2e-3 over a fifth, at most 500 steps.
    assert learning_rate(130, opts, horizon=1300) == pytest.approx(1e-3)
    assert learning_rate(260, opts, horizon=1300) == pytest.approx(2e-3)
    assert learning_rate(250, opts, horizon=20000) == pytest.approx(1e-3)
    assert learning_rate(500, opts, horizon=20000) == pytest.approx(2e-3)
    # Shorter runs: the measured 1.4e-3 over a tenth.
    assert learning_rate(43, opts, horizon=430) == pytest.approx(1.4e-3)
    assert learning_rate(20, opts, horizon=430) == pytest.approx(1.4e-3 * 20 / 43)
    # A warmup the user gives is kept; the peak still goes by the run's length.
    assert learning_rate(100, dataclasses.replace(opts, warmup_steps=100), horizon=430) == pytest.approx(1.4e-3)
    assert learning_rate(100, dataclasses.replace(opts, warmup_steps=100), horizon=5000) == pytest.approx(2e-3)


def test_a_default_post_norm_run_takes_the_rule_and_says_so():
    said = []
    cpu = torch.device("cpu")
    chosen = _chosen_defaults(TrainOptions(task="translate", out="x", preset="small"), cpu, said.append)
    assert (chosen.lr, chosen.schedule_rule) == (2e-3, "post-norm")
    assert "learning rate 0.002 warming up over a fifth of the run (at most 500 steps) where the run makes 1,300" in said[0]
    for opts in (TrainOptions(task="generate", out="x"), TrainOptions(task="translate", out="x", lr=1e-3)):
        assert _chosen_defaults(opts, cpu, said.append).schedule_rule is None  # pre-norm, or a rate the user chose


def test_default_learning_rate_follows_the_normalisation():
    # The post-norm small preset (an encoder-decoder's) takes its own, higher rate; its pre-norm
    # forms (decoder-only, or --set norm_position=pre) keep the preset's.
    def lr(task, preset="small", **overrides):
        return default_lr(TrainOptions(task=task, out="x", preset=preset, config_overrides=overrides or None))[0]

    assert POST_NORM_LR["small"] > PRESET_LR["small"]
    assert lr("translate") == lr("summarize") == lr("qa") == POST_NORM_LR["small"]
    assert lr("generate") == lr("translate", norm_position="pre") == PRESET_LR["small"]
    assert lr("translate", "base") == PRESET_LR["base"] and lr("translate", "tiny") == PRESET_LR["tiny"]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("task", "classify", "--task 'classify' is not translate, summarize, qa or generate"),
        ("schedule", "step", "--schedule 'step' is not linear, inverse_sqrt, cosine or constant"),
        ("average", -1, "--average must be 0 (none) or more"),
        ("max_minutes", 0, "--max-minutes must be more than 0"),
        ("precision", "fp8", "--precision 'fp8' is not fp32, bf16 or fp16"),
        ("batch_tokens", 8, "--batch-tokens must be at least 16"),
        ("keep_checkpoints", -1, "--keep-checkpoints must be 0 (none) or more"),
        ("preset", "huge", "unknown --preset 'huge'"),
        ("lr", -1, "--lr must be more than 0, not -1"),
        ("lr", 0, "--lr must be more than 0, not 0"),
        ("warmup_steps", -5, "--warmup must be 0 or more, not -5"),
        ("clip_norm", -1, "--clip-norm must be 0 or more, not -1"),
        ("weight_decay", -0.1, "--weight-decay must be 0 or more, not -0.1"),
        ("label_smoothing", 1, "--label-smoothing must be at least 0 and less than 1, not 1"),
        ("patience", 0, "--patience must be at least 1"),
        ("block_size", 0, "--block-size must be at least 1"),
    ],
)
def test_train_options_check_themselves_for_library_callers_and_the_cli(field, value, message, tmp_path):
    with pytest.raises(UserError, match=re.escape(message)):
        TrainOptions(**{"task": "translate", "out": "x", field: value})
    # The last --task given wins.
    flag = {"warmup_steps": "--warmup"}.get(field, "--" + field.replace("_", "-"))
    result = invoke("train", "--task", "translate", "--out", str(tmp_path / "m"), flag, str(value))
    assert result.exit_code == 2 and result.output.startswith(f"llmcli: error: {message}"), result.output


@pytest.mark.parametrize(
    "setting, message", [("colour=1", "unknown field(s) colour"), ("d_model=abc", "d_model='abc' should be of type int")]
)
def test_a_bad_set_is_one_line_before_anything_is_written(number_corpus, tmp_path, setting, message):
    out = tmp_path / "m"
    result = invoke(*train_args(number_corpus, out, "--max-steps", "2", "--set", setting))
    assert result.exit_code == 2 and result.output == f"llmcli: error: config: {message}\n", result.output
    assert not out.exists()


def test_train_command_parameters_are_train_options_fields_with_their_defaults():
    params = {p.name: p for p in typer.main.get_command(app).commands["train"].params}
    fields = {f.name: f for f in dataclasses.fields(TrainOptions)}
    options = set(params) - {"nproc", "resume", "quiet", "ensemble"}  # the command's own
    assert options <= set(fields)
    for name in options - {"task", "out"}:  # required (unless --resume)
        assert params[name].default == fields[name].default, name


def test_separate_vocabularies_train_and_resume(number_corpus, tmp_path):
    out = tmp_path / "m"
    assert invoke(*train_args(number_corpus, out, "--max-steps", "2", "--separate-vocab")).exit_code == 0
    assert (out / "source_tokenizer.json").is_file()
    resumed = invoke("train", "--task", "translate", "--resume", str(out), "--max-steps", "3", "--quiet")
    assert resumed.exit_code == 0, resumed.output
    assert (out / "source_tokenizer.json").is_file()


def test_train_log_has_one_line_per_save_and_a_resume_appends(number_corpus, tmp_path):
    out = tmp_path / "m"
    valid = ("--valid-src", str(number_corpus / "valid.en"), "--valid-tgt", str(number_corpus / "valid.zh"))
    assert invoke(*train_args(number_corpus, out, "--max-steps", "6", "--valid-every", "3", *valid)).exit_code == 0
    resumed = invoke("train", "--task", "translate", "--resume", str(out), "--max-steps", "9", "--quiet")
    assert resumed.exit_code == 0, resumed.output
    lines = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    # The first run ends by averaging its two saves (--average's default with validation data).
    averaged = [e for e in lines if "averaged_steps" in e]
    assert [e["averaged_steps"] for e in averaged] == [[3, 6]] and averaged[0]["valid_loss"] > 0
    entries = [e for e in lines if "averaged_steps" not in e]
    assert [e["step"] for e in entries] == [3, 6, 9]
    assert all(e["valid_loss"] > 0 and e["train_loss"] > 0 and e["target_tokens_per_second"] > 0 for e in entries)
    assert entries[0]["target_tokens"] < entries[1]["target_tokens"] < entries[2]["target_tokens"]
    best = min(entries, key=lambda e: e["valid_loss"])
    assert best["best"] is True
    assert abs(entries[0]["valid_perplexity"] - math.exp(entries[0]["valid_loss"])) < 0.01 * entries[0]["valid_perplexity"]


def test_a_time_budget_sets_the_schedule_horizon_and_the_run_fits_it(number_corpus, tmp_path):
    out = tmp_path / "m"
    valid = ("--valid-src", str(number_corpus / "valid.en"), "--valid-tgt", str(number_corpus / "valid.zh"))
    started = time.monotonic()
    args = ("--max-minutes", "0.15", "--max-steps", "100000", "--ensemble", "1", *valid)  # one model's schedule
    result = invoke(*train_args(number_corpus, out, *args))
    seconds = time.monotonic() - started
    assert result.exit_code == 0, result.output
    state = json.loads((out / "train_state" / "state.json").read_text())
    progress = state["progress"]
    # The horizon is what the budget bought (estimated as the run went), not --max-steps...
    assert progress["step"] < progress["horizon"] * 1.5 and progress["horizon"] < 100000
    entries = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    saves = [e for e in entries if "averaged_steps" not in e]
    # ... so the learning rate ends near zero, and saves came by time: about twenty in the budget.
    assert saves[-1]["lr"] < 0.25 * 3e-3
    assert 5 <= len(saves) <= 25
    # The whole run (tokenizer and saves too) keeps to the budget, give or take one save.
    assert seconds < 0.15 * 60 + 10
    assert not (out / "checkpoints").exists()  # kept for the average only


def test_the_average_of_the_last_saves_is_the_model_only_if_it_validates_better(number_corpus, tmp_path):
    from llmcli import checkpoint

    out = tmp_path / "m"
    valid = ("--valid-src", str(number_corpus / "valid.en"), "--valid-tgt", str(number_corpus / "valid.zh"))
    args = ("--max-steps", "9", "--valid-every", "3", "--average", "2", "--keep-checkpoints", "3", *valid)
    assert invoke(*train_args(number_corpus, out, *args)).exit_code == 0
    lines = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    averaged = lines[-1]
    assert averaged["averaged_steps"] == [6, 9]
    kept = [out / "checkpoints" / f"step-{s:07d}" / "model.safetensors" for s in (3, 6, 9)]
    assert all(p.is_file() for p in kept)  # --keep-checkpoints 3 keeps what it asked for
    model = checkpoint.load_weights(out / "model.safetensors")
    mean = checkpoint.mean_weights(kept[1:])
    best_single = min((e for e in lines[:-1]), key=lambda e: e["valid_loss"])
    if averaged["best"]:
        assert averaged["valid_loss"] < best_single["valid_loss"]
        assert all(torch.equal(model[k], mean[k]) for k in model)
    else:
        single = checkpoint.load_weights(kept[best_single["step"] // 3 - 1])
        assert all(torch.equal(model[k], single[k]) for k in model)
    # The state keeps the last weights, to resume from.
    state = checkpoint.load_weights(out / "train_state" / "model.safetensors")
    last = checkpoint.load_weights(kept[-1])
    assert all(torch.equal(state[k], last[k]) for k in state)


def test_auto_vocabulary_scales_with_the_text_and_keeps_room_for_frequent_characters():
    from llmcli.train import auto_vocab_size

    assert auto_vocab_size(["a b c"] * 10) == 1000  # the floor
    assert auto_vocab_size(["x" * 1000] * 3800) == 8000  # Multi30k's size
    assert auto_vocab_size(["y" * 100_000] * 1000) == 32000  # the ceiling
    # 3000 distinct CJK characters, each seen 10 times: room for all of them besides bytes.
    cjk = "".join(chr(0x4E00 + i) for i in range(3000)) * 10
    assert auto_vocab_size([cjk]) >= 260 + 2 * 3000


def test_a_decoder_only_model_has_the_positions_it_is_trained_on(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("".join(f"line {i} of some text.\n" for i in range(100)), encoding="utf-8")
    out = tmp_path / "lm"
    result = invoke("train", "--task", "generate", "--text", str(text), "--out", str(out), "--vocab-size", "300",
                    "--block-size", "48", "--max-steps", "1", "--preset", "tiny", "--quiet")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["max_positions"] == 48


@pytest.mark.skipif(tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 4), reason="fused AdamW on CPU needs torch 2.4")
def test_the_optimizer_is_fused_adamw_without_decay_on_gains_and_biases():
    from llmcli.config import preset
    from llmcli.model import Transformer
    from llmcli.train import _adamw

    model = Transformer(preset("tiny", vocab_size=64, max_positions=32))
    opt = _adamw(model, TrainOptions(task="translate", out="x", lr=1e-3, weight_decay=0.01))
    decay, no_decay = opt.param_groups
    assert decay["fused"] and no_decay["fused"]  # torch 2.4 and up have the CPU kernel
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    model.eval()  # no dropout: both passes alike
    twin, start = copy.deepcopy(model), copy.deepcopy(model)
    reference = torch.optim.AdamW(
        [{"params": [p for p in twin.parameters() if p.dim() >= 2], "weight_decay": 0.01},
         {"params": [p for p in twin.parameters() if p.dim() < 2], "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.98), eps=1e-9, foreach=False,
    )  # fmt: skip
    batch = torch.randint(3, 64, (2, 5)), torch.randint(3, 64, (2, 6)), torch.ones(2, 6, dtype=torch.bool)
    for m, o in ((model, opt), (twin, reference)):
        m(*batch).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b)  # the same AdamW, in one kernel
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), start.parameters(), strict=True))  # it moved


@pytest.mark.skipif(tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 4), reason="fused AdamW on CPU needs torch 2.4")
def test_a_run_saved_with_fused_adamw_resumes_where_there_is_none():
    from llmcli.config import preset
    from llmcli.model import Transformer
    from llmcli.train import _optimizer_tensors, _restore_optimizer

    model = Transformer(preset("tiny", vocab_size=64, max_positions=32))
    params = list(model.parameters())
    model(torch.randint(3, 64, (2, 5)), torch.randint(3, 64, (2, 6)), torch.ones(2, 6, dtype=torch.bool)).sum().backward()
    fused = torch.optim.AdamW(params, lr=1e-3, fused=True)
    fused.step()
    plain = torch.optim.AdamW(params, lr=1e-3, foreach=True)  # what _adamw builds where there is no fused kernel
    _restore_optimizer(plain, *_optimizer_tensors(fused))
    assert not plain.param_groups[0]["fused"] and plain.param_groups[0]["foreach"]
    plain.step()
    assert int(plain.state[params[0]]["step"]) == 2
    older = torch.optim.AdamW(params, lr=1e-3, foreach=True)
    older.step()
    again = torch.optim.AdamW(params, lr=1e-3, fused=True)
    _restore_optimizer(again, *_optimizer_tensors(older))
    assert not again.param_groups[0]["fused"]  # an older run resumes with the kernel it was saved with, bit for bit


@pytest.mark.parametrize("more_from, chosen", [(0.01, 0.2), (1000, 0.0)])
def test_dropout_is_raised_when_the_run_makes_many_passes_and_a_resume_keeps_it(
    number_corpus, tmp_path, monkeypatch, more_from, chosen
):
    # 6 or 9 steps of 400-token batches are less than a pass over the 400 training lines, so the
    # threshold is lowered below them, or left far above; the choice is made at step 3 here (160 in
    # a real run). The preset's dropout is 0 in this test.
    monkeypatch.setattr("llmcli.train.DROPOUT_CHOSEN_AT", 3)
    monkeypatch.setattr("llmcli.train.DROPOUT_MORE_PASSES", more_from)
    fields = set_args({k: v for k, v in TINY_FIELDS.items() if k != "dropout"})
    monkeypatch.setitem(PRESETS, "tiny", dict(PRESETS["tiny"], dropout=0.0))
    args = [a for a in train_args(number_corpus, tmp_path / "m", "--preset", "tiny") if a not in TINY_CONFIG] + fields
    result = invoke(*args, "--max-steps", "6", "--schedule", "inverse_sqrt")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dropout"] == chosen
    log = invoke(*[a for a in args if a != "--quiet"], "--max-steps", "6", "--out", str(tmp_path / "logged"))
    assert re.search(rf"dropout {chosen:g}: the run will make about [\d.]+ passes", log.output), log.output
    # A run resumed after the choice goes on with it, bit for bit with one never stopped, even
    # when the best model (config.json) was saved before the choice: the state keeps it.
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(dict(config, dropout=0.0)))
    whole = [a if a != str(tmp_path / "m") else str(tmp_path / "whole") for a in args]
    assert invoke(*whole, "--max-steps", "9", "--schedule", "inverse_sqrt").exit_code == 0
    resumed = invoke("train", "--task", "translate", "--resume", str(tmp_path / "m"), "--max-steps", "9", "--quiet")
    assert resumed.exit_code == 0, resumed.output
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()


def test_dropout_the_user_set_is_kept_whatever_the_passes(number_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr("llmcli.train.DROPOUT_CHOSEN_AT", 3)
    monkeypatch.setattr("llmcli.train.DROPOUT_MORE_PASSES", 0.01)
    assert invoke(*train_args(number_corpus, tmp_path / "m", "--max-steps", "6")).exit_code == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dropout"] == 0.1
