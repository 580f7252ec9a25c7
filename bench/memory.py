"""Peak memory of converting and of opening a model, against its float32 weights.

    python bench/memory.py [--mb 400] [--shards 3] [--family llama|gpt2|gpt2-124m] [--dtype bfloat16] [--old /tmp/base]

Builds a random Hugging Face Llama (or GPT-2, --family gpt2) of about --mb MB in float32 with transformers, saved in
--shards safetensors shards (--family gpt2-124m: GPT-2 small's shape, 12 layers of 768, 50257 tokens,
475 MiB, --mb ignored; 68% of its weights are Conv1D, transposed on conversion), then measures each
step in a fresh subprocess: the peak resident set (VmHWM, which counts mapped file pages too) minus
that of `import torch`, as a ratio to the float32 weight bytes. --old runs llmcli from another tree (PYTHONPATH) beside this one.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HWM = "print('HWM', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
STEPS = {
    "import torch": "import torch",
    "llmcli convert + save": "import torch; from llmcli import convert; convert.save(convert.convert(SRC), DST)",
    "llmcli open (generate)": "import torch; from llmcli import tasks; m = tasks.open_model(DST, 'generate')",
    # Mapped weights are read on first use: as a first forward pass would, read every one
    "llmcli open + read every weight": "import torch; from llmcli import tasks; m = tasks.open_model(DST, 'generate')\n"
    "s = sum(float(p.sum()) for p in m.model.parameters())",
    # -m naming the Hugging Face directory: converted into the cache (hub.converted), saved, then opened
    "llmcli -m HF dir + read every weight": "import torch; from llmcli import tasks; m = tasks.open_model(SRC, 'generate')\n"
    "s = sum(float(p.sum()) for p in m.model.parameters())",
    "transformers from_pretrained": "import torch, transformers; m = transformers.AutoModelForCausalLM.from_pretrained(SRC)",
}


def make_model(src: Path, mb: int, shards: int, family: str = "llama", dtype: str = "float32") -> int:
    import torch
    import transformers

    d, layers = 1024, 4
    torch.manual_seed(0)
    if family == "gpt2-124m":
        vocab = 50257
        cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=768, n_layer=12, n_head=12, bos_token_id=1, eos_token_id=2)
        model = transformers.GPT2LMHeadModel(cfg).float()
    elif family == "gpt2":  # Conv1D weights: transposed on conversion
        vocab = max(1000, (mb * 2**20 // 4 - layers * 12 * d * d) // d)  # tied embeddings and head
        cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=d, n_layer=layers, n_head=16, bos_token_id=1, eos_token_id=2)
        model = transformers.GPT2LMHeadModel(cfg).float()
    else:
        vocab = max(1000, (mb * 2**20 // 4 - layers * 12 * d * d) // (2 * d))  # untied embeddings and head
        cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=4 * d, num_hidden_layers=layers,
                                       num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False)  # fmt: skip
        model = transformers.LlamaForCausalLM(cfg).float()
    nbytes = sum(p.numel() * 4 for p in model.parameters())  # float32, whatever the file holds
    size = nbytes * getattr(torch, dtype).itemsize // 4
    model.to(getattr(torch, dtype)).save_pretrained(src, max_shard_size=f"{size // shards // 2**20 + 1}MB")
    _tokenizer(src, vocab)
    return nbytes


def _tokenizer(src: Path, vocab: int) -> None:
    """A word-level tokenizer.json whose ids fit the model (llmcli needs one to convert)."""
    import tokenizers

    words = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i + 3 for i in range(min(vocab, 500) - 3)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(src / "tokenizer.json"))


def peak(code: str, env: dict, cwd: str) -> int:
    # cwd: `python -c` puts it first on sys.path, ahead of PYTHONPATH
    out = subprocess.run([sys.executable, "-c", code + "\n" + HWM], env=env, capture_output=True, text=True, cwd=cwd)
    if out.returncode:
        sys.exit(out.stderr)
    return int(out.stdout.split("HWM")[-1].split()[0]) * 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=400)
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--family", choices=["llama", "gpt2", "gpt2-124m"], default="llama")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="of the file")
    ap.add_argument("--old", help="a tree of llmcli to compare with (its PYTHONPATH)")
    args = ap.parse_args()
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    print("\n".join(line for line in cpu if line.startswith(("Model name", "Flags"))))
    trees = {"this tree": str(Path(__file__).resolve().parents[1])}
    if args.old:
        trees["--old tree"] = args.old
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "hf"
        nbytes = make_model(src, args.mb, args.shards, args.family, args.dtype)
        files = sorted(p.name for p in src.glob("*.safetensors"))
        print(
            f"random {args.family} in {args.dtype}: {nbytes / 2**20:.0f} MiB of float32 weights in {len(files)} shards ({', '.join(files)})"
        )
        for label, tree in trees.items():
            env = dict(
                os.environ,
                PYTHONPATH=tree,
                LLMCLI_HOME=str(Path(tmp) / f"home-{len(label)}"),
                LLMCLI_CACHE=str(Path(tmp) / f"cache-{len(label)}"),
                OMP_NUM_THREADS="1",
            )
            dst = Path(tmp) / f"ours-{len(label)}"
            base = peak(STEPS["import torch"], env, tmp)
            print(f"{label} ({tree}): import torch {base / 2**20:.0f} MiB")
            for step, code in list(STEPS.items())[1:]:
                if step.startswith("transformers") and label != "this tree":
                    continue
                used = peak(f"SRC, DST = {str(src)!r}, {str(dst)!r}\n" + code, env, tmp) - base
                print(f"  {step:30s} peak - import torch = {used / 2**20:6.0f} MiB = {used / nbytes:.2f}x the float32 weights")


if __name__ == "__main__":
    main()
