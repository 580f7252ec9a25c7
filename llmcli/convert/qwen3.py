"""Qwen3 (Yang et al. 2025): Llama with an RMSNorm over each head of q and k before rope
(`q_norm`, `k_norm`), a head size of its own (128 at every size), no q/k/v biases by default.
"""

from __future__ import annotations

from llmcli.config import ModelConfig
from llmcli.convert import llama, qwen2
from llmcli.errors import UserError

MODEL_TYPES = ("qwen3",)
ARCHITECTURES = ("Qwen3ForCausalLM",)
TASK = "generate"


def config(hf: dict, tensors: dict, gen: dict) -> ModelConfig:
    if hf.get("attention_bias"):  # biases on q, k, v and o but not the FFN: no released model has them
        raise UserError("config.json: Qwen3 with attention_bias=true is not supported")
    cfg = llama.config(hf, tensors, gen)
    return cfg.replace(qk_norm=True, sliding_window=qwen2.sliding_window(hf, "config.json"))


def weight_map(hf: dict, cfg: ModelConfig) -> dict:
    names = llama.weight_map(hf, cfg)
    for prefix in ("model.", ""):
        for x in "qk":
            names[f"{prefix}layers.{{}}.self_attn.{x}_norm.weight"] = f"decoder.layers.{{}}.self_attn.{x}_norm.weight"
    return names
