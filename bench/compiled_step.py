"""A compiled decoding step against llmcli's eager one, on the same weights.

The issue's untried lever for one-sentence latency: `torch.compile` (inductor, CPU) of the
decoder with weight freezing (inductor packs the linear weights for oneDNN itself) and dynamic
shapes (the key/value cache grows every step), on the plain model, against llmcli's eager step
with `llmcli.fast.prepare`'s kernels. Random marian-base weights (bench/decode.py's), greedy,
32 new tokens, one thread; tok/s is the best of --repeat runs after the first, which compiles.

    python bench/compiled_step.py                         # fp32 and bf16, batch 1 and 32
    python bench/compiled_step.py --precision bf16 --batch 1 --cpp-wrapper

int8 and int4 are not compared: dynamo cannot trace llmcli's quantized layers (their packed
weights are opaque objects), and inductor's own int8 path needs a PT2E-quantized export.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from decode import build, inputs, machine, run_llmcli  # bench/decode.py, beside this file


def tokens_per_second(model, rows, new: int, repeat: int) -> tuple[float, float]:
    """(first run's seconds, best tok/s of the runs after it)."""
    started = time.perf_counter()
    run_llmcli(model, rows, 1, new, model.cfg.eos_id)
    first = time.perf_counter() - started
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        run_llmcli(model, rows, 1, new, model.cfg.eos_id)
        best = min(best, time.perf_counter() - started)
    return first, len(rows) * new / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--batch", default="1,32", help="comma-separated batch sizes")
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--repeat", type=int, default=4)
    p.add_argument("--cpp-wrapper", action="store_true", help="inductor's C++ wrapper instead of its Python one")
    p.add_argument("--json", help="also write the rows and the machine here")
    args = p.parse_args()
    torch.set_num_threads(1)
    import torch._inductor.config as inductor

    from llmcli import fast
    from llmcli.convert import convert_weights
    from llmcli.device import reuse_freed_memory

    reuse_freed_memory()
    inductor.freezing = True
    inductor.cpp_wrapper = args.cpp_wrapper
    info = machine()
    print(f"# {info['cpu']}; flags: {' '.join(info['flags']) or '-'}; torch {info['torch']}; 1 thread; "
          f"cpp_wrapper {args.cpp_wrapper}", flush=True)  # fmt: skip
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        build("marian", "base", Path(tmp))
        for precision in args.precision.split(","):
            for batch in (int(b) for b in args.batch.split(",")):
                eager = fast.prepare(convert_weights(Path(tmp)).eval(), precision)
                cfg = eager.cfg
                rows = inputs(cfg.vocab_size, batch, 16, 24, {cfg.pad_id, cfg.bos_id, cfg.eos_id, cfg.start_id})
                _, eager_rate = tokens_per_second(eager, rows, args.new, args.repeat)
                del eager  # measured alone: the compiled model is made after
                plain = convert_weights(Path(tmp)).eval()
                if precision == "bf16":
                    plain = plain.to(torch.bfloat16)
                plain.decoder.forward = torch.compile(plain.decoder.forward, dynamic=True)
                compile_s, compiled_rate = tokens_per_second(plain, rows, args.new, args.repeat)
                row = dict(precision=precision, batch=batch, eager_tok_s=eager_rate, compiled_tok_s=compiled_rate,
                           first_compiled_run_s=compile_s)  # fmt: skip
                out.append(row)
                print(f"{precision:5s} batch {batch:3d}  eager (llmcli.fast) {eager_rate:8.1f} tok/s  compiled {compiled_rate:8.1f}"
                      f"  ratio {compiled_rate / eager_rate:.2f}  first compiled run {compile_s:.0f} s", flush=True)  # fmt: skip
                torch._dynamo.reset()
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "args": vars(args), "rows": out}, indent=1))


if __name__ == "__main__":
    main()
