"""Decoding throughput on the same weights: llmcli (converted from a Hugging Face checkpoint)
vs `transformers` generate, and vs CTranslate2 when it is installed (not a dependency of
llmcli: `pip install ctranslate2` for the benchmark only).

Random weights of a Marian and a GPT-2 / Llama shape (saved with save_pretrained, then
converted by `llmcli.convert` and by CTranslate2's converter); batch 32 of random sources
or prompts; greedy and beam 4. Every row produces exactly --new tokens on every side (end of
sequence is banned until then), so tokens/s counts the same work. Each measurement is the
best of --repeat runs after one warm-up; the systems alternate so machine noise hits all alike.

    python bench/decode.py                          # small shapes, a few minutes on 2 cores
    python bench/decode.py --size base --new 64     # transformer-base Marian (6+6 x 512), GPT-2 124M
    python bench/decode.py --families marian --threads 2 --repeat 3
    python bench/decode.py --batch 1 --new 64       # one sentence at a time, as in chat
    LLMCLI_ONEDNN=0 python bench/decode.py          # llmcli's linear layers on MKL, as transformers' are
    python bench/decode.py --profile 3              # and where each llmcli run's time goes (torch.profiler)
    python bench/decode.py --families llama --size 135m --batch 1,8 --new 48 --beams 1 \
        --precision fp32,bf16,int8,int4 --json out.json   # the SmolLM-135M shape; CTranslate2 fp32 and int8

--precision runs llmcli once per kind (llmcli.fast.prepare); CTranslate2 runs at compute_type
float32 and int8 (--ct2). 'agree' is the share of generated tokens equal to llmcli fp32's (random
weights give flat distributions, so this is a weak quality signal; the quality guard is measured
on trained models). The header names the CPU and its flags: the kinds differ most by those.

Where llmcli's time goes (torch.profiler, one thread): the linear layers take 50-80% of it and run
at 75-105 GFLOP/s through packed oneDNN, near this kind of core's fp32 peak; transformers runs the
same products through MKL at 40-80. The rest is attention over the cache, which reads the whole
cache every step, beam bookkeeping and Python.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

SIZES = {
    # d_model, layers (each stack for Marian), heads, FFN, vocabulary
    "small": dict(d=256, layers=3, heads=4, ffn=1024, vocab=8000),
    "base": dict(d=512, layers=6, heads=8, ffn=2048, vocab=32000),  # Vaswani et al. transformer-base
}
DECODER_SIZES = {
    "small": dict(d=256, layers=4, heads=4, ffn=1024, vocab=8000),
    "base": dict(d=768, layers=12, heads=12, ffn=3072, vocab=50257),  # GPT-2 124M
    # SmolLM-135M's shape (Llama only): 3 key/value heads, tied embeddings
    "135m": dict(d=576, layers=30, heads=9, kv_heads=3, ffn=1536, vocab=49152, tied=True),
}


def build(family: str, size: str, directory: Path):
    """A random Hugging Face model of `family`, saved to `directory` (with a word-level tokenizer
    naming every id, which CTranslate2's converter reads)."""
    import transformers

    torch.manual_seed(0)
    if family == "marian":
        s = SIZES[size]
        V = s["vocab"]
        cfg = transformers.MarianConfig(
            vocab_size=V, d_model=s["d"], encoder_layers=s["layers"], decoder_layers=s["layers"],
            encoder_attention_heads=s["heads"], decoder_attention_heads=s["heads"], encoder_ffn_dim=s["ffn"],
            decoder_ffn_dim=s["ffn"], max_position_embeddings=512, pad_token_id=V - 1, eos_token_id=0,
            decoder_start_token_id=V - 1, forced_eos_token_id=None, scale_embedding=True, activation_function="swish")  # fmt: skip
        model = transformers.MarianMTModel(cfg)
    else:
        s = DECODER_SIZES[size]
        V = s["vocab"]
        if family == "gpt2":
            cfg = transformers.GPT2Config(n_layer=s["layers"], n_embd=s["d"], n_head=s["heads"], n_inner=s["ffn"],
                                          vocab_size=V, n_positions=1024, bos_token_id=0, eos_token_id=0)  # fmt: skip
            model = transformers.GPT2LMHeadModel(cfg)
        else:
            cfg = transformers.LlamaConfig(hidden_size=s["d"], intermediate_size=s["ffn"], num_hidden_layers=s["layers"],
                                           num_attention_heads=s["heads"],
                                           num_key_value_heads=s.get("kv_heads", max(1, s["heads"] // 4)),
                                           vocab_size=V, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
                                           tie_word_embeddings=s.get("tied", False))  # fmt: skip
            model = transformers.LlamaForCausalLM(cfg)
    model.eval().save_pretrained(directory)
    _word_tokenizer(V, model.config).save_pretrained(directory)
    return model


def _word_tokenizer(V: int, config):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = {i: f"w{i}" for i in range(V)}
    special = {}
    for role, name in (("pad", "<pad>"), ("bos", "<s>"), ("eos", "</s>")):  # the names CTranslate2's loaders expect
        i = getattr(config, f"{role}_token_id", None)
        if i is not None:
            names[i] = name if names[i].startswith("w") else names[i]
            special[f"{role}_token"] = names[i]
    names[V - 2] = "<unk>"
    tok = Tokenizer(models.WordLevel({n: i for i, n in names.items()}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **special)


def inputs(V: int, batch: int, low: int, high: int, banned: set[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        n = int(torch.randint(low, high + 1, (1,), generator=g))
        row = torch.randint(3, V - 2, (n,), generator=g).tolist()
        rows.append([t for t in row if t not in banned] or [3])
    return rows


# ---------------------------------------------------------------- the systems


def run_llmcli(model, rows, beam: int, new: int, eos: int):
    from llmcli import decoding
    from llmcli.cache import PAD_TOKEN

    cfg = model.cfg
    W = max(map(len, rows))
    with torch.inference_mode():
        if cfg.is_encoder_decoder:
            src = torch.tensor([r + [cfg.pad_id] * (W - len(r)) for r in rows])
            mask = torch.arange(W)[None] < torch.tensor([len(r) for r in rows])[:, None]
            cache = model.new_cache(len(rows), model.encode(src, mask), mask)
            start = torch.full((len(rows), 1), cfg.start_id)
        else:
            start = torch.tensor([[PAD_TOKEN] * (W - len(r)) + r for r in rows])
            cache = model.new_cache(len(rows))
        common = dict(eos_id=eos, max_new_tokens=new, min_new_tokens=new)
        if beam == 1:
            return [h.tokens for h in decoding.greedy_search(model.step, cache, start, **common)]
        return [h[0].tokens for h in decoding.beam_search(model.step, cache, start, beam_size=beam, **common)]


def run_transformers(model, rows, beam: int, new: int, eos: int):
    c = model.config
    W = max(map(len, rows))
    with torch.inference_mode():
        if c.is_encoder_decoder:
            src = torch.tensor([r + [c.pad_token_id] * (W - len(r)) for r in rows])
            out = model.generate(input_ids=src, attention_mask=(src != c.pad_token_id).long(), num_beams=beam,
                                 max_new_tokens=new, min_new_tokens=new, do_sample=False)[:, 1:]  # fmt: skip
        else:
            src = torch.tensor([[eos] * (W - len(r)) + r for r in rows])
            mask = torch.tensor([[j >= W - len(r) for j in range(W)] for r in rows]).long()
            out = model.generate(input_ids=src, attention_mask=mask, num_beams=beam, max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, pad_token_id=eos)[:, W:]  # fmt: skip
    return [[t for t in row if t != eos][:new] for row in out.tolist()]


class CTranslate2:
    def __init__(self, directory: Path, family: str, threads: int, compute_type: str = "float32"):
        import ctranslate2

        out = directory.parent / (directory.name + "-ct2")
        if not out.exists():  # float32 on disk; compute_type quantizes when loading, as `ct2 --compute_type` does
            ctranslate2.converters.TransformersConverter(str(directory)).convert(str(out), force=True)
        kind = ctranslate2.Translator if family == "marian" else ctranslate2.Generator
        self.engine = kind(str(out), device="cpu", inter_threads=1, intra_threads=threads, compute_type=compute_type)
        self.family = family

    def __call__(self, rows, beam: int, new: int, eos: int):
        tokens = [[f"w{t}" for t in r] for r in rows]
        if self.family == "marian":
            tokens = [t + ["</s>"] for t in tokens]
            results = self.engine.translate_batch(tokens, beam_size=beam, max_decoding_length=new,
                                                  min_decoding_length=new, return_scores=False)  # fmt: skip
            return [[int(t[1:]) if t[:1] == "w" else -1 for t in r.hypotheses[0]] for r in results]  # names -> ids
        else:
            results = self.engine.generate_batch(tokens, beam_size=beam, max_length=new, min_length=new,
                                                 include_prompt_in_result=False, return_scores=False)  # fmt: skip
        return [r.sequences_ids[0] for r in results]


def best_time(fn, repeat: int) -> tuple[float, object]:
    out, best = None, float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def machine() -> dict:
    """The CPU and the flags that decide which precisions are fast on it."""
    from llmcli.device import CPU_FLAGS, cpu_flags, cpu_name

    flags = cpu_flags()
    return {"cpu": cpu_name(), "flags": [f for f in CPU_FLAGS if f in flags],
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}  # fmt: skip


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
    same = sum(a == b for x, y in zip(tokens, reference) for a, b in zip(x, y))
    return same / max(1, sum(len(y) for y in reference))


CT2_NAMES = {"float32": "ct2 fp32", "int8": "ct2 int8", "int8_float32": "ct2 int8", "int16": "ct2 int16"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(set(SIZES) | set(DECODER_SIZES)), default="small")
    p.add_argument("--families", default="marian,gpt2,llama", help="comma-separated: marian, gpt2, llama")
    p.add_argument("--batch", default="32", help="comma-separated batch sizes")
    p.add_argument("--new", type=int, default=32, help="tokens generated per row")
    p.add_argument("--beams", default="1,4", help="comma-separated beam sizes (1: greedy)")
    p.add_argument("--precision", default="fp32", help="comma-separated llmcli precisions: fp32, bf16, int8, int4")
    p.add_argument("--ct2", default="float32,int8", help="comma-separated CTranslate2 compute types ('' for none)")
    p.add_argument("--no-transformers", action="store_true", help="skip transformers (then 'same' is not checked)")
    p.add_argument("--repeat", type=int, default=2, help="timed runs per measurement (the best counts)")
    p.add_argument("--json", help="also write the rows and the machine to this JSON file")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after each row, profile one run of each llmcli precision (torch.profiler) and print its N costliest ops")  # fmt: skip
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads per system (default 1: on a shared machine more threads oversubscribe and time noise)",
    )
    p.add_argument("--torch-reductions", action="store_true",
                   help="also run each llmcli precision with torch's argmax and topk instead of llmcli.decoding's blocked ones")  # fmt: skip
    p.add_argument("--malloc-default", action="store_true",
                   help="leave glibc's malloc as it is; by default the process keeps freed memory for reuse, as llmcli's "
                        "commands do (llmcli.device.reuse_freed_memory): it applies to every system here")  # fmt: skip
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from llmcli.device import reuse_freed_memory

    reused = False if args.malloc_default else reuse_freed_memory()
    from llmcli import fast
    from llmcli.convert import convert_weights

    try:
        import ctranslate2  # noqa: F401

        ct2_types = [t for t in args.ct2.split(",") if t]
    except ImportError:
        ct2_types = []
    precisions = args.precision.split(",")
    info = machine()
    print(f"# {info['cpu']}; flags: {' '.join(info['flags']) or '-'}; torch {info['torch']} "
          f"(cpu capability {info['torch_cpu_capability']}); {args.threads} thread(s); best of {args.repeat} "
          f"after a warm-up; llmcli int8 kernel: {fast.INT8_KERNEL}{f' (oneDNN on AMX tiles from {fast.INT8_TILES_MIN_ROWS} rows and {fast.INT8_TILES_MIN_WORK:,} multiply-adds a product)' if fast.INT8_TILES else ''}; freed memory kept for reuse: {'yes' if reused else 'no'}", flush=True)  # fmt: skip
    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            directory = Path(tmp) / family
            hf = build(family, args.size, directory)
            systems_made = {f"llmcli {prec}": fast.prepare(convert_weights(directory), prec) for prec in precisions}
            ours = next(iter(systems_made.values()))
            V = ours.cfg.vocab_size
            eos = ours.cfg.eos_id
            banned = {ours.cfg.pad_id, ours.cfg.bos_id, eos, ours.cfg.start_id}
            engines = {CT2_NAMES.get(t, f"ct2 {t}"): CTranslate2(directory, family, args.threads, t) for t in ct2_types}
            params = sum(x.numel() for x in ours.parameters()) / 1e6
            for batch in (int(b) for b in args.batch.split(",")):
                rows = inputs(V, batch, 16, 24, banned) if family == "marian" else inputs(V, batch, 8, 16, banned)
                for beam in (int(b) for b in args.beams.split(",")):
                    systems = {name: (lambda m=m: run_llmcli(m, rows, beam, args.new, eos)) for name, m in systems_made.items()}
                    if args.torch_reductions:
                        for name, m in systems_made.items():
                            systems[f"{name}, torch's argmax/topk"] = lambda m=m: _with_torch_reductions(
                                lambda: run_llmcli(m, rows, beam, args.new, eos)
                            )
                    if not args.no_transformers:
                        systems["transformers"] = lambda: run_transformers(hf, rows, beam, args.new, eos)
                    for name, engine in engines.items():
                        systems[name] = lambda e=engine: e(rows, beam, args.new, eos)
                    for fn in systems.values():  # warm-up
                        fn()
                    times = {name: float("inf") for name in systems}
                    outputs = {}
                    for _ in range(args.repeat):  # alternate, so noise hits all alike
                        for name, fn in systems.items():
                            t, outputs[name] = best_time(fn, 1)
                            times[name] = min(times[name], t)
                    tokens = batch * args.new
                    reference = outputs.get("llmcli fp32")
                    row = {"model": f"{family}-{args.size} ({params:.1f}M)", "batch": batch,
                           "search": "greedy" if beam == 1 else f"beam {beam}",
                           "tok_s": {name: tokens / t for name, t in times.items()},
                           "agree": {name: agreement(out, reference) for name, out in outputs.items()} if reference else {},
                           "same": outputs["llmcli fp32"] == outputs["transformers"] if reference and "transformers" in outputs else None}  # fmt: skip
                    rows_out.append(row)
                    _print_row(row, header=len(rows_out) == 1)
                    for name in systems_made if args.profile else ():
                        _print_profile(name, systems[name], args.profile)
    print(f"\n{args.new} new tokens per row; tok/s = batch x new tokens / best wall time; 'same': llmcli fp32's "
          "tokens == transformers'" + ("" if ct2_types else "; ctranslate2 not installed (pip install ctranslate2 to compare)"))  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "args": vars(args), "rows": rows_out}, indent=1))


def _with_torch_reductions(fn):
    """fn run with torch's own argmax and topk where llmcli.decoding uses its blocked ones."""
    from llmcli import decoding

    ours = decoding.argmax, decoding.topk
    decoding.argmax, decoding.topk = (lambda x: x.argmax(-1)), (lambda x, k: tuple(x.topk(k, -1)))
    try:
        return fn()
    finally:
        decoding.argmax, decoding.topk = ours


def _print_profile(name: str, fn, n: int) -> None:
    """The n ops of most self time in one run, with their calls: where a step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops)
    print(f"  {name}: {total / 1e3:,.0f} ms profiled; " + "; ".join(
        f"{e.key} {e.self_cpu_time_total / total:.0%} ({e.count} calls)" for e in ops[:n]), flush=True)  # fmt: skip


def _print_row(row: dict, header: bool) -> None:
    if header:
        print(f"{'model':24} {'batch':>5} {'search':7} {'system':13} {'tok/s':>9} {'/ct2 fp32':>9} {'/ct2 int8':>9} {'agree':>6}")
    tok = row["tok_s"]
    for name, value in tok.items():
        ratios = [f"{value / tok[peer]:8.2f}x" if peer in tok else f"{'-':>9}" for peer in ("ct2 fp32", "ct2 int8")]
        agree = row["agree"].get(name)
        print(f"{row['model']:24} {row['batch']:5} {row['search']:7} {name:13} {value:9,.1f} {' '.join(ratios)} "
              f"{'-' if agree is None else f'{agree:.2f}':>6}")  # fmt: skip
    if row["same"] is not None:
        print(f"{'':24} llmcli fp32 tokens == transformers': {'yes' if row['same'] else 'NO'}", flush=True)


if __name__ == "__main__":
    main()
