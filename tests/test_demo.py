"""`llmcli demo`'s cached model: kept when its run finished, trained again when its time ran out."""

import functools
import json

from llmcli import demo_data
from llmcli.demo import DEMO_STEPS, GOOD_EXACT_MATCH, run_demo, stopped_short
from llmcli.train import SilentReporter


class Logged(SilentReporter):
    def __init__(self):
        self.messages = []

    def log(self, message):
        self.messages.append(message)


def test_a_demo_cut_off_by_its_time_trains_again_and_one_that_finished_is_kept(monkeypatch):
    # The demo's corpus cut down (40,000 lines and 500 test numbers cost a minute a run); the decisions are the same.
    monkeypatch.setattr(demo_data, "splits", functools.partial(demo_data.splits, n_train=1500, n_valid=20, n_test=20))
    # Half a second of training: far short of the demo's steps and of its exact-match aim.
    first_log = Logged()
    first = run_demo(max_minutes=0.01, reporter=first_log)
    assert first.trained and 0 < first.steps < DEMO_STEPS
    assert first.exact_match < GOOD_EXACT_MATCH
    assert stopped_short(first.model_dir) == (first.steps, DEMO_STEPS)
    assert any(f"ran out at step {first.steps} of {DEMO_STEPS}" in m and "trains again" in m for m in first_log.messages)

    second_log = Logged()
    second = run_demo(max_minutes=0.01, reporter=second_log)
    assert second.trained
    assert any(f"stopped at step {first.steps} of {DEMO_STEPS}" in m and "training it again" in m for m in second_log.messages)

    # A run that made all the steps it planned is the demo's model, whatever it scores: kept.
    state_file = second.model_dir / "train_state" / "state.json"
    state = json.loads(state_file.read_text())
    state["options"]["max_steps"] = second.steps
    state_file.write_text(json.dumps(state))
    assert stopped_short(second.model_dir) is None
    third_log = Logged()
    third = run_demo(max_minutes=0.01, reporter=third_log)
    assert not third.trained and third.steps == 0
    assert (third.exact_match, third.chrf) == (second.exact_match, second.chrf)
    assert not any("training it again" in m for m in third_log.messages)


def test_stopped_short_without_a_training_record_is_none(tmp_path):
    assert stopped_short(tmp_path) is None
    (tmp_path / "train_state").mkdir()
    (tmp_path / "train_state" / "state.json").write_text("{not json")
    assert stopped_short(tmp_path) is None


def test_a_damaged_cached_demo_model_is_trained_again(monkeypatch):
    monkeypatch.setattr(demo_data, "splits", functools.partial(demo_data.splits, n_train=300, n_valid=10, n_test=10))
    first = run_demo(max_minutes=0.005)
    weights = first.model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # cut short, as by a full disk or a copy stopped halfway
    log = Logged()
    second = run_demo(max_minutes=0.005, reporter=log)
    assert second.trained
    assert any("cannot be used" in m and "training it again" in m for m in log.messages), log.messages
    assert len(weights.read_bytes()) > 1000
