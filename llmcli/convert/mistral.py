"""Mistral (Jiang et al. 2023): Llama with sliding-window attention, each position seeing the
`sliding_window` positions up to itself (null from v0.2 on: full attention). Keys older than
the window stay in llmcli's cache, masked.
"""

from __future__ import annotations

from llmcli.config import ModelConfig
from llmcli.convert import llama
from llmcli.errors import UserError

MODEL_TYPES = ("mistral",)
ARCHITECTURES = ("MistralForCausalLM",)
TASK = "generate"


def config(hf: dict, tensors: dict, gen: dict) -> ModelConfig:
    kinds = set(hf.get("layer_types") or ["sliding_attention"])
    if len(kinds) > 1:
        raise UserError("config.json: Mistral with full and sliding-window layers mixed (Ministral) is not supported")
    window = None if kinds == {"full_attention"} else hf.get("sliding_window")
    return llama.config(hf, tensors, gen).replace(sliding_window=window)


weight_map = llama.weight_map
