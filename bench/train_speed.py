"""Training throughput: llmcli's model vs Hugging Face's MarianMTModel of the same shape.

Both train on the same token batches (real Multi30k sentences when ../shared/data is present,
random tokens of Multi30k-like lengths otherwise) with the same fused AdamW; steps alternate between
the two so machine noise hits both alike. Reports target tokens/s and the ratio.

    python bench/train_speed.py                 # transformer-base, 6 timed steps each
    python bench/train_speed.py --preset small --steps 20
    python bench/train_speed.py --preset small --precision fp32,bf16 --json t.json

--precision bf16 runs both models' forward passes and losses under torch.autocast(bfloat16), as
`llmcli train --precision bf16` does: fp32 master weights, gradients and AdamW. Each precision
gets fresh models from the same seed; the header names the CPU and the flags that decide bf16.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llmcli.config import preset
from llmcli.data import IGNORE_INDEX, collate, make_batches, seq2seq_example
from llmcli.device import precision_facts, reuse_freed_memory
from llmcli.fast import prepare_training, smoothed_cross_entropy
from llmcli.model import Transformer
from llmcli.train import fused_adamw

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"


def batches(vocab: int, batch_tokens: int, n: int, seed: int = 0):
    if (SHARED / "train.en").exists():
        from llmcli.tokenizer import train_tokenizer

        en = (SHARED / "train.en").read_text(encoding="utf-8").splitlines()[:5000]
        de = (SHARED / "train.de").read_text(encoding="utf-8").splitlines()[:5000]
        tok = train_tokenizer(en + de, vocab_size=vocab)
        pairs = list(zip(tok.encode_batch(en), tok.encode_batch(de)))
        source = "multi30k"
    else:
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(8, 24, (5000,), generator=g).tolist()
        pairs = [(torch.randint(4, vocab, (n_,), generator=g).tolist(),) * 2 for n_ in lengths]
        source = "random tokens"
    examples = [seq2seq_example(s, t, start_id=1, eos_id=2, max_len=256) for s, t in pairs]
    order = make_batches([max(len(e.src), len(e.tgt)) for e in examples], batch_tokens, seed=seed, epoch=0)
    return [collate([examples[i] for i in b], pad_id=0) for b in order[:n]], source


def hf_marian(cfg):
    from transformers import MarianConfig, MarianMTModel

    hf_cfg = MarianConfig(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, encoder_layers=cfg.n_encoder_layers,
        decoder_layers=cfg.n_decoder_layers, encoder_attention_heads=cfg.n_heads, decoder_attention_heads=cfg.n_heads,
        encoder_ffn_dim=cfg.d_ff, decoder_ffn_dim=cfg.d_ff, activation_function="relu", dropout=cfg.dropout,
        attention_dropout=0.0, activation_dropout=0.0, max_position_embeddings=cfg.max_positions, pad_token_id=0,
        eos_token_id=2, decoder_start_token_id=1, scale_embedding=True, share_encoder_decoder_embeddings=True,
    )  # fmt: skip
    return MarianMTModel(hf_cfg)


def ours_step(model, batch):
    logits = model(batch.tokens, batch.src, batch.src_mask)
    # the loss as llmcli train computes it
    return smoothed_cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), 0.1, IGNORE_INDEX) / batch.n_target_tokens


def hf_step(model, batch):
    out = model(input_ids=batch.src, attention_mask=batch.src_mask.long(), decoder_input_ids=batch.tokens)
    return F.cross_entropy(out.logits.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE_INDEX, label_smoothing=0.1)


def autocast(precision: str):
    # What llmcli/train.py's _autocast does on a CPU.
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)


def measure(cfg, data, precision: str) -> dict[str, list[float]]:
    """Target tokens/s of each step, per contender, steps alternating between them."""
    torch.manual_seed(0)
    contenders = {"llmcli": (prepare_training(Transformer(cfg)), ours_step)}  # as llmcli train builds it
    try:
        contenders["transformers"] = (hf_marian(cfg), hf_step)
    except ImportError:
        print("transformers is not installed: measuring llmcli alone")
    # fused, as both trainers use it (llmcli train; transformers' Trainer from torch 2.8, adamw_torch_fused)
    optimizers = {k: fused_adamw(m.parameters(), lr=1e-4) for k, (m, _) in contenders.items()}
    rates: dict[str, list[float]] = {k: [] for k in contenders}
    for i, batch in enumerate(data):
        for name, (model, step) in contenders.items():
            model.train()
            started = time.perf_counter()
            with autocast(precision):
                loss = step(model, batch)
            optimizers[name].zero_grad()
            loss.backward()
            optimizers[name].step()
            seconds = time.perf_counter() - started
            if i > 0:  # the first step warms up allocators and kernels
                rates[name].append(batch.n_target_tokens / seconds)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--precision", default="fp32", help="comma-separated: fp32, bf16 (autocast, as llmcli train)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--malloc-default", action="store_true",
                        help="leave glibc's malloc as it is; by default both models run as `llmcli train` does, with "
                             "freed memory kept for reuse (llmcli.device.reuse_freed_memory)")  # fmt: skip
    args = parser.parse_args()
    reused = False if args.malloc_default else reuse_freed_memory()
    precisions = [x.strip() for x in args.precision.split(",") if x.strip()]
    if bad := [x for x in precisions if x not in ("fp32", "bf16")]:
        parser.error(f"unknown precision(s) {', '.join(bad)}; use fp32 or bf16")
    facts = precision_facts()  # what `llmcli info` says of this CPU
    print(f"# {facts['cpu']}; flags: {' '.join(facts['cpu flags'])}; torch {torch.__version__} ({facts['torch cpu']}), "
          f"{torch.get_num_threads()} threads; freed memory kept for reuse: {'yes' if reused else 'no'}")  # fmt: skip
    # sinusoids, as MarianMTModel has, so that both models do the same arithmetic (the small
    # preset's own rotary positions cost no measurable time: bench/README.md, "Rotary positions")
    cfg = preset(args.preset, vocab_size=args.vocab, max_positions=256, positions="sinusoidal")
    data, source = batches(args.vocab, args.batch_tokens, args.steps + 1)
    n_params = sum(p.numel() for p in Transformer(cfg).parameters())
    print(f"preset {args.preset} ({n_params / 1e6:.1f}M parameters), {source}, batch {args.batch_tokens} tokens, "
          f"{args.steps} timed steps")  # fmt: skip
    results = {}
    for precision in precisions:
        rates = measure(cfg, data, precision)
        medians = {name: statistics.median(values) for name, values in rates.items()}
        results[precision] = {"target_tokens_per_second": medians, "steps": rates}
        for name, median in medians.items():
            print(f"{precision:5} {name:14} {median:10,.0f} target tokens/s (median)")
        if "transformers" in medians:
            results[precision]["ratio"] = medians["llmcli"] / medians["transformers"]
            print(f"{precision:5} ratio llmcli / transformers: {results[precision]['ratio']:.2f}")
    if "fp32" in results and "bf16" in results:
        for name in results["bf16"]["target_tokens_per_second"]:
            speedup = results["bf16"]["target_tokens_per_second"][name] / results["fp32"]["target_tokens_per_second"][name]
            print(f"bf16 / fp32, {name}: {speedup:.2f}")
    if args.json:
        report = {"cpu": facts["cpu"], "cpu_flags": facts["cpu flags"], "torch": torch.__version__,
                  "threads": torch.get_num_threads(), "preset": args.preset, "parameters": n_params, "data": source,
                  "batch_tokens": args.batch_tokens, "timed_steps": args.steps, "results": results}  # fmt: skip
        args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()
