"""Llama (Touvron et al. 2023): RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases.

Hugging Face's Llama files already hold q and k in the rotate-half layout our `apply_rope`
uses (their conversion from Meta's interleaved layout permuted the rows), so the map is a
plain rename. Only the default rotary scaling is supported (not "llama3", "yarn", ...).
"""

from __future__ import annotations

from llmcli.config import ModelConfig
from llmcli.convert.common import activation, is_tied, optional_prefix, require, token_ids
from llmcli.errors import UserError

MODEL_TYPES = ("llama",)
ARCHITECTURES = ("LlamaForCausalLM",)
TASK = "generate"


def rope_theta(hf: dict, where: str) -> float:
    # transformers 5 writes rope_parameters; older files rope_theta and rope_scaling
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise UserError(f"{where}: rotary scaling {kind!r} is not supported (llmcli runs the default RoPE)")
    return float(params.get("rope_theta") or hf.get("rope_theta") or 10000.0)


def config(hf: dict, tensors: dict, gen: dict) -> ModelConfig:
    where = "config.json"
    if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
        raise UserError(f"{where}: attention_bias={hf.get('attention_bias')} with mlp_bias={hf.get('mlp_bias')} "
                        "is not supported (llmcli has biases everywhere or nowhere)")  # fmt: skip
    require(hf, where, pretraining_tp=1)
    ids = token_ids(hf, gen)
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or d // heads
    kv = hf.get("num_key_value_heads") or heads
    return ModelConfig(
        architecture="decoder-only", vocab_size=hf["vocab_size"], d_model=d, n_heads=heads,
        d_head=None if head_dim * heads == d else head_dim, n_kv_heads=None if kv == heads else kv,
        n_encoder_layers=0, n_decoder_layers=hf["num_hidden_layers"], d_ff=hf["intermediate_size"],
        activation=activation(hf.get("hidden_act", "silu"), where), glu=True, norm="rmsnorm", norm_position="pre",
        norm_eps=hf.get("rms_norm_eps", 1e-6), positions="rope", max_positions=hf.get("max_position_embeddings", 2048),
        rope_theta=rope_theta(hf, where), dropout=0.0, attention_dropout=float(hf.get("attention_dropout") or 0.0),
        tied_output=is_tied(tensors, "lm_head.weight", "model.embed_tokens.weight"),
        bias=bool(hf.get("attention_bias", False)), pad_id=ids["pad"], bos_id=ids["bos"], eos_id=ids["eos"],
    )  # fmt: skip


def weight_map(hf: dict, cfg: ModelConfig) -> dict:
    theirs, ours = "model.layers.{}.", "decoder.layers.{}."
    names = {
        "model.embed_tokens.weight": "decoder.embed_tokens.weight",
        "model.norm.weight": "decoder.final_norm.weight",
        "lm_head.weight": "decoder.embed_tokens.weight" if cfg.tied_output else "lm_head.weight",
        theirs + "self_attn.rotary_emb.inv_freq": None,  # recomputed
        theirs + "input_layernorm.weight": ours + "self_attn_norm.weight",
        theirs + "post_attention_layernorm.weight": ours + "ffn_norm.weight",
    }
    params = ("weight", "bias") if cfg.bias else ("weight",)
    for p in params:
        for x in "qkvo":
            names[theirs + f"self_attn.{x}_proj.{p}"] = ours + f"self_attn.{x}_proj.{p}"
        for a, b in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            names[theirs + f"mlp.{a}.{p}"] = ours + f"ffn.{b}.{p}"
    return optional_prefix("model.", names)
