"""Gemma (Gemma Team 2024): Llama with RMSNorm scaling by (1 + weight), embeddings times
sqrt(d_model), a gelu-tanh gated FFN, a head size of its own (256), tied embeddings.

Gemma 2 and 3 (soft-capping, pre- and post-norms, alternating local layers) are other
model_types, read by gemma2.py and gemma3.py.
"""

from __future__ import annotations

from llmcli.config import ModelConfig
from llmcli.convert import llama
from llmcli.convert.common import activation
from llmcli.errors import UserError

MODEL_TYPES = ("gemma",)
ARCHITECTURES = ("GemmaForCausalLM",)
TASK = "generate"


def config(hf: dict, tensors: dict, gen: dict) -> ModelConfig:
    # transformers 4.x reads hidden_activation (None: gelu_pytorch_tanh); both map a legacy
    # "gelu" to the tanh approximation the models were trained with
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if hf.get(key) is not None:
            raise UserError(f"config.json: {key}={hf[key]} (Gemma 2 and 3's soft-capping) is not supported")
    name = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    name = "gelu_pytorch_tanh" if name == "gelu" else name
    cfg = llama.config({**hf, "hidden_act": name}, tensors, gen)
    return cfg.replace(norm_weight_offset=1.0, scale_embeddings=True, activation=activation(name, "config.json"))


weight_map = llama.weight_map
