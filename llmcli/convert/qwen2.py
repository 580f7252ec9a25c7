"""Qwen2 and Qwen2.5 (Yang et al. 2024): Llama with biases on q, k and v (none on o), tied
embeddings at the small sizes (0.5B-3B), which `is_tied` sees in the tensors.

Their sliding window is per layer (from `max_window_layers` on, or `layer_types`) and off in
every released model: one window on every layer runs, a mix of windowed and full layers does not.
"""

from __future__ import annotations

from llmcli.config import ModelConfig
from llmcli.convert import llama
from llmcli.errors import UserError

MODEL_TYPES = ("qwen2",)
ARCHITECTURES = ("Qwen2ForCausalLM",)
TASK = "generate"


def sliding_window(hf: dict, where: str) -> int | None:
    """The one window every layer uses, or None; transformers 5 writes `layer_types` (and
    sliding_window null when off), 4.x `use_sliding_window` and `max_window_layers`."""
    n_layers = hf["num_hidden_layers"]
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    types = hf.get("layer_types")
    if types is None:
        start = hf.get("max_window_layers", 0) if window is not None else n_layers
        types = ["sliding_attention" if i >= start else "full_attention" for i in range(n_layers)]
    kinds = set(types) if window is not None else {"full_attention"}
    if kinds == {"full_attention"}:
        return None
    if kinds == {"sliding_attention"}:
        return window
    raise UserError(f"{where}: sliding-window attention on some layers only ({', '.join(sorted(kinds))}) is not supported")


def config(hf: dict, tensors: dict, gen: dict) -> ModelConfig:
    # Qwen2 writes no attention_bias: its q, k, v always have biases, o and the FFN never
    cfg = llama.config({**hf, "attention_bias": False, "mlp_bias": False}, tensors, gen)
    return cfg.replace(qkv_bias=True, sliding_window=sliding_window(hf, "config.json"))


def weight_map(hf: dict, cfg: ModelConfig) -> dict:
    names = llama.weight_map(hf, cfg)
    for prefix in ("model.", ""):
        for x in "qkv":
            names[f"{prefix}layers.{{}}.self_attn.{x}_proj.bias"] = f"decoder.layers.{{}}.self_attn.{x}_proj.bias"
    return names
