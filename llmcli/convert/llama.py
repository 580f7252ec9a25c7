"""Llama (Touvron et al. 2023): RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases.

Hugging Face's Llama files already hold q and k in the rotate-half layout our `apply_rope`
uses (their conversion from Meta's interleaved layout permuted the rows), so the map is a
plain rename. Rotary scaling (linear, dynamic, llama3, yarn) is read by `rope` as transformers
4.x (`rope_scaling`, `rope_theta` at the top) and 5.x (`rope_parameters`) write it.
"""

from __future__ import annotations

import math

from llmcli.config import ModelConfig
from llmcli.convert.common import activation, is_tied, optional_prefix, require, token_ids
from llmcli.errors import UserError

MODEL_TYPES = ("llama",)
ARCHITECTURES = ("LlamaForCausalLM",)
TASK = "generate"


SCALINGS = {"default": "none", "linear": "linear", "dynamic": "dynamic", "llama3": "llama3", "yarn": "yarn"}


def _rope_dict(hf: dict, where: str) -> tuple[dict, str]:
    # transformers 5 writes rope_parameters; 4.x rope_scaling (which 5 still prefers when given) and rope_theta
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if any(isinstance(v, dict) for v in params.values()):
        raise UserError(f"{where}: rope parameters per layer type ({', '.join(params)}) are not supported here")
    return params, params.get("rope_type") or params.get("type") or "default"


def rope_theta(hf: dict, where: str) -> float:
    """The rope base, for a family that runs the default rope only: any scaling is refused."""
    params, kind = _rope_dict(hf, where)
    if kind != "default":
        raise UserError(f"{where}: rotary scaling {kind!r} is not supported for this family (llmcli runs the default RoPE)")
    return float(params.get("rope_theta") or hf.get("rope_theta") or 10000.0)


def rope(hf: dict, where: str) -> dict:
    """ModelConfig's rope fields (rope_theta, rope_scaling, rope_factor, ...) from their config,
    with transformers' defaults (`standardize_rope_params`, `_compute_*_parameters`)."""
    params, kind = _rope_dict(hf, where)
    if kind not in SCALINGS:
        raise UserError(f"{where}: rotary scaling {kind!r} is not supported "
                        f"(llmcli runs {', '.join(SCALINGS)})")  # fmt: skip
    fields = dict(rope_theta=float(params.get("rope_theta") or hf.get("rope_theta") or 10000.0), rope_scaling=SCALINGS[kind])
    if kind == "default":
        return fields

    def need(key: str) -> float:
        if params.get(key) is None:
            raise UserError(f"{where}: rotary scaling {kind!r} needs {key!r} in its parameters")
        return float(params[key])

    max_positions = hf.get("max_position_embeddings", 2048)
    # transformers 5 prefers a top-level original_max_position_embeddings (Phi-3 writes it there)
    original = hf.get("original_max_position_embeddings") or params.get("original_max_position_embeddings") or max_positions
    if kind == "linear":
        return {**fields, "rope_factor": need("factor")}
    if kind == "dynamic":  # stretches past max_position_embeddings itself
        return {**fields, "rope_factor": need("factor"), "rope_original_max_positions": int(max_positions)}
    if kind == "llama3":
        return {**fields, "rope_factor": need("factor"), "rope_original_max_positions": int(original),
                "rope_low_freq_factor": need("low_freq_factor"), "rope_high_freq_factor": need("high_freq_factor")}  # fmt: skip
    factor = float(params["factor"]) if params.get("factor") is not None else max_positions / original
    attention = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if attention is None and mscale and mscale_all_dim:  # DeepSeek's ratio of two mscales

        def m(s: float) -> float:
            return 1.0 if factor <= 1 else 0.1 * s * math.log(factor) + 1.0

        attention = m(mscale) / m(mscale_all_dim)
    return {**fields, "rope_factor": factor, "rope_original_max_positions": int(original),
            "rope_beta_fast": float(params.get("beta_fast") or 32), "rope_beta_slow": float(params.get("beta_slow") or 1),
            "rope_attention_factor": None if attention is None else float(attention),
            "rope_truncate": bool(params.get("truncate", True))}  # fmt: skip


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
        **rope(hf, where), dropout=0.0, attention_dropout=float(hf.get("attention_dropout") or 0.0),
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
