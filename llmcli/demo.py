"""`llmcli demo`: the whole pipeline offline on generated data.

Generate English-number-words -> Chinese-numerals pairs, train a small encoder-decoder
(a few minutes on two CPU cores), translate numbers it never saw, score them.
The model is kept under the user's cache directory and reused unless --retrain, or unless
its run was cut off by the time budget (a busy or slow machine) and it scores below the
demo's aim: then the next run trains again.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from llmcli import demo_data
from llmcli.checkpoint import is_model_dir
from llmcli.errors import UserError
from llmcli.io import atomic_write, cache_root
from llmcli.models import DEMO_NAME

# Sized to reach >= 90% exact match on unseen numbers in under 3 minutes on 2 CPU cores.
DEMO_STEPS, GOOD_EXACT_MATCH = 600, 90.0
DEMO_CONFIG = dict(d_model=128, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, d_ff=256, dropout=0.0, max_positions=64)


@dataclass
class DemoResult:
    model_dir: Path
    data_dir: Path
    trained: bool
    train_seconds: float
    steps: int
    examples: list[tuple[str, str, str]]  # source, reference, output
    exact_match: float
    chrf: float
    n_test: int


def _write(path: Path, lines: list[str]) -> None:
    with atomic_write(path) as f:
        f.write("".join(line + "\n" for line in lines))


def write_corpus(data_dir: Path) -> None:
    for split, numbers in demo_data.splits().items():
        english, chinese = demo_data.pairs(numbers)
        _write(data_dir / f"{split}.en", english)
        _write(data_dir / f"{split}.zh", chinese)


def stopped_short(model_dir: Path) -> tuple[int, int] | None:
    """(steps made, steps planned) when the run that trained `model_dir` ended before its
    planned steps (its time budget ran out first), else None (finished, or no record of it)."""
    from llmcli.train import load_train_state

    try:
        state = load_train_state(model_dir)
        made, planned = int(state["progress"]["step"]), int(state["options"]["max_steps"])
    except (UserError, OSError, ValueError, KeyError, TypeError):
        return None
    return (made, planned) if made < planned else None


def _train(model_dir: Path, data_dir: Path, max_minutes: float, reporter, seed: int) -> int:
    from llmcli.train import TrainOptions, train

    shutil.rmtree(model_dir, ignore_errors=True)
    options = TrainOptions(
        task="translate",
        out=str(model_dir),
        src=str(data_dir / "train.en"),
        tgt=str(data_dir / "train.zh"),
        valid_src=str(data_dir / "valid.en"),
        valid_tgt=str(data_dir / "valid.zh"),
        vocab_size=400,  # room for every English word and Chinese numeral as a token
        preset="tiny",
        config_overrides=DEMO_CONFIG,
        batch_tokens=3000,
        lr=2e-3,
        warmup_steps=100,
        label_smoothing=0.0,
        max_steps=DEMO_STEPS,
        max_minutes=max_minutes,
        valid_every=200,
        seed=seed,
        device="cpu",
    )
    return train(options, reporter).steps


@dataclass
class _Scored:
    english: list[str]
    chinese: list[str]
    outputs: list[str]
    exact_match: float
    chrf: float


def _score(model_dir: Path, data_dir: Path) -> _Scored:
    from llmcli import metrics
    from llmcli.tasks import DecodeSettings, open_model, seq2seq

    loaded = open_model(str(model_dir), "translate")
    english = (data_dir / "test.en").read_text(encoding="utf-8").splitlines()
    chinese = (data_dir / "test.zh").read_text(encoding="utf-8").splitlines()
    outputs = [o.text for o in seq2seq(loaded, english, DecodeSettings(beam_size=1, max_len=32))]
    exact, chrf = metrics.exact(outputs, [chinese])["score"], metrics.chrf(outputs, [chinese])["score"]
    return _Scored(english, chinese, outputs, exact, chrf)


def run_demo(retrain: bool = False, max_minutes: float = 3.0, reporter=None, seed: int = 1) -> DemoResult:
    log = reporter.log if reporter is not None else (lambda message: None)
    root = cache_root() / DEMO_NAME
    model_dir, data_dir = root / "model", root / "data"
    write_corpus(data_dir)
    trained, seconds, steps, scored = False, 0.0, 0, None
    if not retrain and is_model_dir(model_dir):
        try:
            scored = _score(model_dir, data_dir)
        except UserError as error:  # the cache is ours to rebuild: a damaged copy is no reason to stop
            log(f"the cached demo model cannot be used ({str(error).splitlines()[0]}): training it again")
            retrain = True
    if scored is not None:
        short = stopped_short(model_dir)
        # A cached model cut off by its time budget (a busy or slow machine) is not the demo's
        # model: train again rather than show its mistakes on every run.
        if short is not None and scored.exact_match < GOOD_EXACT_MATCH:
            log(
                f"the cached demo model stopped at step {short[0]} of {short[1]} when its time ran out and gets "
                f"{scored.exact_match:.1f}% exact match: training it again"
            )
            retrain, scored = True, None
    if retrain or not is_model_dir(model_dir):
        started = time.monotonic()
        steps = _train(model_dir, data_dir, max_minutes, reporter, seed)
        seconds, trained = time.monotonic() - started, True
        scored = _score(model_dir, data_dir)
        if steps < DEMO_STEPS:
            log(
                f"the --max-minutes {max_minutes:g} budget ran out at step {steps} of {DEMO_STEPS} (a busy or slow "
                f"machine?): --max-minutes {2 * max_minutes:g} gives it longer"
                + ("; the next `llmcli demo` trains again" if scored.exact_match < GOOD_EXACT_MATCH else "")
            )
    english, chinese, outputs = scored.english, scored.chinese, scored.outputs
    picks = [0, 1, 2, 3, 4]
    # Show the first mistake too, if the shown examples hold none: an honest sample.
    wrong = [i for i, (o, r) in enumerate(zip(outputs, chinese)) if o != r and i not in picks][:1]
    examples = [(english[i], chinese[i], outputs[i]) for i in picks + wrong]
    return DemoResult(model_dir, data_dir, trained, seconds, steps, examples, scored.exact_match, scored.chrf, len(english))
