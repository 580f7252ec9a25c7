"""Data-parallel speed: `llmcli train --nproc 2` against one process, same global batch.

Both runs are the real command line, on the same data and model: one process with
--accumulate 2, and two processes (gloo on CPU, DDP) with --accumulate 1, so every
optimizer step sees the same 2 x --batch-tokens tokens. Reported: target tokens/s of the
training loop (the CLI's own summary line, without start-up and tokenizer training), for
each --repeat, interleaved so that machine noise hits both alike.

Each of the two processes has half the cores (OMP_NUM_THREADS, as `--nproc` sets it).
One process runs twice: with all cores (torch's intra-op threads; what a user of this
machine compares with) and with half of them (the same compute per process as each of
the two: the efficiency of data parallelism itself).

    python bench/train_ddp.py                          # tiny preset, 2 x 1024 tokens, 20 steps, twice
    python bench/train_ddp.py --preset small --steps 40 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"


def corpus(directory: Path, lines: int) -> tuple[Path, Path, str]:
    if (SHARED / "train.en").exists():
        src, tgt = directory / "train.en", directory / "train.de"
        src.write_text("".join((SHARED / "train.en").read_text(encoding="utf-8").splitlines(True)[:lines]), encoding="utf-8")
        tgt.write_text("".join((SHARED / "train.de").read_text(encoding="utf-8").splitlines(True)[:lines]), encoding="utf-8")
        return src, tgt, "multi30k en-de"
    from llmcli import demo_data

    en, zh = demo_data.pairs(demo_data.splits(n_train=lines, n_valid=10, n_test=10, seed=1)["train"])
    src, tgt = directory / "train.en", directory / "train.zh"
    src.write_text("".join(s + "\n" for s in en), encoding="utf-8")
    tgt.write_text("".join(s + "\n" for s in zh), encoding="utf-8")
    return src, tgt, "generated numbers en-zh"


def tokens_per_second(args: list[str], env: dict) -> float:
    result = subprocess.run([sys.executable, "-m", "llmcli", *args], capture_output=True, env=env, timeout=1800)
    err = result.stderr.decode()
    if result.returncode != 0:
        sys.exit(f"train_ddp: {' '.join(args[:3])}... failed:\n{err}")
    match = re.search(r"\(([0-9,]+) target tokens/s\)", err)
    return float(match.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch-tokens", type=int, default=1024, help="per process and batch; the global batch is twice this")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lines", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=2)
    opts = parser.parse_args()

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src, tgt, name = corpus(tmp, opts.lines)
        tokenizer_run = tmp / "tok"
        common = ["train", "--task", "translate", "--src", str(src), "--tgt", str(tgt), "--preset", opts.preset,
                  "--vocab-size", "4000", "--batch-tokens", str(opts.batch_tokens), "--max-steps", str(opts.steps),
                  "--valid-every", str(opts.steps * 10), "--warmup", "10", "--device", "cpu"]  # fmt: skip
        # Train the tokenizer once; every timed run reuses it.
        tokens_per_second([*common, "--max-steps", "1", "--out", str(tokenizer_run)], dict(os.environ))
        common += ["--tokenizer", str(tokenizer_run)]
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        half = dict(env, OMP_NUM_THREADS=str(max(1, cores // 2)))
        one, one_half, two = [], [], []
        for i in range(opts.repeat):
            one.append(tokens_per_second([*common, "--accumulate", "2", "--out", str(tmp / f"one{i}")], env))
            one_half.append(tokens_per_second([*common, "--accumulate", "2", "--out", str(tmp / f"half{i}")], half))
            two.append(tokens_per_second([*common, "--nproc", "2", "--out", str(tmp / f"two{i}")], env))
            print(f"run {i + 1}: 1 process {one[-1]:7,.0f} tok/s (all cores), {one_half[-1]:7,.0f} tok/s (half)   "
                  f"2 processes {two[-1]:7,.0f} tok/s   ratio {two[-1] / one[-1]:.2f} / {two[-1] / one_half[-1]:.2f}")  # fmt: skip
    median = statistics.median
    print(
        f"{name}, preset {opts.preset}, global batch 2 x {opts.batch_tokens} tokens, {opts.steps} steps, {cores} cores: "
        f"2 processes / 1 process = {median(two) / median(one):.2f} against all cores, "
        f"{median(two) / median(one_half):.2f} against half (medians of {opts.repeat})"
    )


if __name__ == "__main__":
    main()
