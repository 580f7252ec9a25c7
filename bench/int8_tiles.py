"""int8 products on a CPU: fbgemm against oneDNN (which multiplies on AMX-INT8 tiles where the CPU
has them), by shape and rows, through torch's `quantized::linear_dynamic` as llmcli.fast calls it.
Prints, for each point, both times, the faster kernel and the one llmcli's rule picks
(`fast.tiles_are_faster`), so a new CPU kind
shows at once whether the rule holds there.

    python bench/int8_tiles.py                 # one thread, marian-base's and SmolLM-135M's shapes
    python bench/int8_tiles.py --threads 2 --json tiles.json
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

from llmcli import fast
from llmcli.device import CPU_FLAGS, cpu_flags, cpu_name

SHAPES = [(512, 512), (512, 1536), (512, 2048), (2048, 512), (576, 1536), (1536, 576), (512, 32000)]  # (inputs, outputs)
ROWS = (1, 4, 8, 16, 32, 64, 128)


def pack(weight: torch.Tensor, engine: str):
    torch.backends.quantized.engine = engine
    scale = (weight.abs().amax(1) / 127).clamp(min=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        q = torch.quantize_per_channel(weight, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(q, None)


def microseconds(x: torch.Tensor, packed, seconds: float = 0.2) -> float:
    def call():
        return torch.ops.quantized.linear_dynamic(x, packed, False)

    for _ in range(5):
        call()
    start = time.perf_counter()
    call()
    n = max(5, int(seconds / max(time.perf_counter() - start, 1e-6)))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(n):
            call()
        best = min(best, (time.perf_counter() - start) / n)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the points here")
    args = parser.parse_args()
    if "onednn" not in torch.backends.quantized.supported_engines or "fbgemm" not in torch.backends.quantized.supported_engines:
        raise SystemExit("bench/int8_tiles.py: this torch lacks the fbgemm or onednn quantized engine")
    torch.set_num_threads(args.threads)
    flags = cpu_flags()
    print(f"# {cpu_name()}; flags: {' '.join(f for f in CPU_FLAGS if f in flags) or '-'}; torch {torch.__version__}; "
          f"{args.threads} thread(s); llmcli uses the tiles here: {'yes' if fast.INT8_TILES else 'no'}", flush=True)  # fmt: skip
    print(f"{'inputs':>6} {'outputs':>7} {'rows':>4} {'fbgemm us':>9} {'oneDNN us':>9}  faster  rule picks")
    points = []
    for k, n in SHAPES:
        weight = torch.randn(n, k)
        packs = {engine: pack(weight, engine) for engine in ("fbgemm", "onednn")}
        for rows in ROWS:
            x = torch.randn(rows, k)
            times = {engine: microseconds(x, packed) for engine, packed in packs.items()}
            faster = min(times, key=times.get)
            rule = "onednn" if fast.tiles_are_faster(rows, k, n) else "fbgemm"
            points.append({"inputs": k, "outputs": n, "rows": rows, "us": times, "faster": faster, "rule": rule})
            print(f"{k:>6} {n:>7} {rows:>4} {times['fbgemm']:>9.0f} {times['onednn']:>9.0f}  {faster:<6}  {rule}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"cpu": cpu_name(), "flags": sorted(flags & set(CPU_FLAGS)), "threads": args.threads, "points": points},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
