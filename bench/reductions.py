"""Argmax and top-k over vocabulary-long rows: torch's CPU kernels against llmcli.decoding's
blocked ones, one thread, milliseconds a call (best of the repeats).

    python bench/reductions.py
"""

from __future__ import annotations

import argparse
import time

import torch

from llmcli.decoding import argmax, topk
from llmcli.device import CPU_FLAGS, cpu_flags, cpu_name


def best_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=50)
    args = p.parse_args()
    torch.set_num_threads(1)
    flags = " ".join(f for f in CPU_FLAGS if f in cpu_flags())
    print(f"# {cpu_name()}; flags: {flags}; torch {torch.__version__}; 1 thread")
    print(f"{'what':34} {'rows':>5} {'row width':>10} {'torch ms':>9} {'llmcli ms':>10} {'speed-up':>9}")
    cases = [("argmax (greedy)", rows, width, None) for rows in (1, 32, 128) for width in (32_000, 151_936)]
    cases += [("top 2k of k beams (beam 4: k=4)", rows, 4 * width, 8) for rows in (1, 32) for width in (32_000, 58_101)]
    cases += [("top 50 (sampling's top-k)", rows, 32_000, 50) for rows in (1, 32)]
    for what, rows, width, k in cases:
        scores = torch.randn(rows, width)
        if k is None:
            ours, theirs = (lambda: argmax(scores)), (lambda: scores.argmax(-1))
            assert torch.equal(ours(), theirs())
        else:
            ours, theirs = (lambda: topk(scores, k)), (lambda: scores.topk(k, -1))
            assert torch.equal(ours()[1], theirs().indices)
        t_torch, t_ours = best_ms(theirs, args.repeat), best_ms(ours, args.repeat)
        print(f"{what:34} {rows:>5} {width:>10,} {t_torch:>9.3f} {t_ours:>10.3f} {t_torch / t_ours:>8.1f}x")


if __name__ == "__main__":
    main()
