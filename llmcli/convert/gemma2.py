"""Gemma 2 (Gemma Team 2024b): Gemma with a norm before and after each sublayer ("sandwich":
input_layernorm and post_attention_layernorm around attention, pre_ and post_feedforward_layernorm
around the FFN), attention and output logits soft-capped (tanh(x / cap) * cap), the attention
scale 1/sqrt(query_pre_attn_scalar), and local (sliding-window) and global layers alternating.

`layer_kinds` reads transformers 5's `layer_types`, or 4.x's fixed alternation (even layers local).
Gemma 3 (gemma3.py) reuses this module's config and name table.
"""

from __future__ import annotations

from llmcli.config import ModelConfig
from llmcli.convert import llama
from llmcli.convert.common import activation
from llmcli.errors import UserError

MODEL_TYPES = ("gemma2",)
ARCHITECTURES = ("Gemma2ForCausalLM",)
TASK = "generate"

LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}


def layer_kinds(hf: dict, where: str, default_types: list[str]) -> dict:
    """sliding_window and layer_kinds from their layer_types (or `default_types` where a 4.x file has none)."""
    types = hf.get("layer_types") or default_types
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown:
        raise UserError(f"{where}: layer type(s) {', '.join(unknown)} are not supported (llmcli runs {', '.join(LAYER_TYPES)})")
    if len(types) != hf["num_hidden_layers"]:
        raise UserError(f"{where}: layer_types has {len(types)} entries for num_hidden_layers={hf['num_hidden_layers']}")
    window = hf.get("sliding_window")
    kinds = tuple(LAYER_TYPES[t] for t in types)
    if window is None or set(kinds) == {"full"}:
        return dict(sliding_window=None, layer_kinds=None)
    return dict(sliding_window=window, layer_kinds=None if set(kinds) == {"sliding"} else kinds)


def config(hf: dict, tensors: dict, gen: dict, default_types: list[str] | None = None) -> ModelConfig:
    where = "config.json"
    if hf.get("use_bidirectional_attention"):
        raise UserError(f"{where}: use_bidirectional_attention=true (Gemma embedding models) is not supported")
    n = hf["num_hidden_layers"]
    if default_types is None:  # transformers 4.x Gemma 2: layer 0 local, then alternating
        default_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    name = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    name = "gelu_pytorch_tanh" if name == "gelu" else name  # as gemma.py: Gemma means the tanh approximation
    cfg = llama.config({**hf, "hidden_act": name}, tensors, gen)
    scalar = hf.get("query_pre_attn_scalar", 256)
    return cfg.replace(
        norm_weight_offset=1.0, scale_embeddings=True, activation=activation(name, where), norm_position="sandwich",
        attention_scale=float(scalar) ** -0.5, attention_softcap=_cap(hf.get("attn_logit_softcapping")),
        logits_softcap=_cap(hf.get("final_logit_softcapping")), **layer_kinds(hf, where, default_types),
    )  # fmt: skip


def _cap(value) -> float | None:
    return None if value is None else float(value)


def weight_map(hf: dict, cfg: ModelConfig) -> dict:
    names = llama.weight_map(hf, cfg)
    theirs, ours = "layers.{}.", "decoder.layers.{}."
    for prefix in ("model.", ""):
        names[prefix + theirs + "post_attention_layernorm.weight"] = ours + "self_attn_post_norm.weight"
        names[prefix + theirs + "pre_feedforward_layernorm.weight"] = ours + "ffn_norm.weight"
        names[prefix + theirs + "post_feedforward_layernorm.weight"] = ours + "ffn_post_norm.weight"
    return names
