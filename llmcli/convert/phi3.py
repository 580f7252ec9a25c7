"""Phi-3 (Abdin et al. 2024): Llama's architecture with q, k and v fused into one qkv_proj
(rows: q, then k, then v; unequal parts under grouped-query attention) and the FFN's gate and
up fused into gate_up_proj (gate first), cut here into our separate projections.

The 128k models' longrope (`rope_scaling` {"type": "longrope", short_factor, long_factor}; "su" and
"yarn" in older files, which transformers reads as longrope) becomes rope_scaling="longrope" with
its factor lists, as transformers' `_compute_longrope_parameters` reads them. Partial rotary
embeddings are refused in one line. Its sliding window (mini-4k: 2047) goes into `sliding_window`.
"""

from __future__ import annotations

from llmcli.config import ModelConfig
from llmcli.convert.common import activation, is_tied, optional_prefix, split, token_ids
from llmcli.errors import UserError

MODEL_TYPES = ("phi3",)
ARCHITECTURES = ("Phi3ForCausalLM",)
TASK = "generate"


def config(hf: dict, tensors: dict, gen: dict) -> ModelConfig:
    where = "config.json"
    params = hf.get("rope_parameters") or {}
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise UserError(f"{where}: partial_rotary_factor={partial} is not supported (llmcli rotates every dimension)")
    ids = token_ids(hf, gen)
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or d // heads
    kv = hf.get("num_key_value_heads") or heads
    return ModelConfig(
        architecture="decoder-only", vocab_size=hf["vocab_size"], d_model=d, n_heads=heads,
        d_head=None if head_dim * heads == d else head_dim, n_kv_heads=None if kv == heads else kv,
        n_encoder_layers=0, n_decoder_layers=hf["num_hidden_layers"], d_ff=hf["intermediate_size"],
        activation=activation(hf.get("hidden_act", "silu"), where), glu=True, norm="rmsnorm", norm_position="pre",
        norm_eps=hf.get("rms_norm_eps", 1e-5), positions="rope", max_positions=hf.get("max_position_embeddings", 4096),
        **rope(hf, where, head_dim), sliding_window=hf.get("sliding_window"), dropout=0.0,
        attention_dropout=float(hf.get("attention_dropout") or 0.0),
        tied_output=is_tied(tensors, "lm_head.weight", "model.embed_tokens.weight"),
        bias=False, pad_id=ids["pad"], bos_id=ids["bos"], eos_id=ids["eos"],
    )  # fmt: skip


def rope(hf: dict, where: str, head_dim: int) -> dict:
    """ModelConfig's rope fields: the default rope, or longrope."""
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    kind = params.get("rope_type") or params.get("type") or "default"
    theta = float(params.get("rope_theta") or hf.get("rope_theta") or 10000.0)
    if kind == "default":
        return dict(rope_theta=theta)
    if kind not in ("longrope", "su", "yarn"):
        raise UserError(f"{where}: rotary scaling {kind!r} is not supported for Phi-3 (llmcli runs default and longrope)")
    factors = {}
    for key in ("short_factor", "long_factor"):
        value = params.get(key)
        if not isinstance(value, list) or len(value) != head_dim // 2:
            raise UserError(f"{where}: longrope needs {key} as a list of {head_dim // 2} numbers (head_dim / 2)")
        factors[f"rope_{key}"] = tuple(float(x) for x in value)
    # transformers' Phi3Config puts its own original_max_position_embeddings (default 4096) over the dict's
    original = int(hf.get("original_max_position_embeddings") or 4096)
    factor = params.get("factor")
    factor = float(factor) if factor is not None else hf.get("max_position_embeddings", 4096) / original
    attention = params.get("attention_factor")
    return dict(rope_theta=theta, rope_scaling="longrope", rope_factor=factor, rope_original_max_positions=original,
                rope_attention_factor=None if attention is None else float(attention), **factors)  # fmt: skip


def split_qkv(cfg: ModelConfig):
    """qkv_proj's rows: n_heads * D of q, then n_kv_heads * D each of k and v."""
    sizes = [cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim]

    def cut(t):
        if t.shape[0] != sum(sizes):
            return [t]  # apply_map names the mismatch
        return [part.contiguous() for part in t.split(sizes, dim=0)]

    return cut


def weight_map(hf: dict, cfg: ModelConfig) -> dict:
    theirs, ours = "model.layers.{}.", "decoder.layers.{}."
    names = {
        "model.embed_tokens.weight": "decoder.embed_tokens.weight",
        "model.norm.weight": "decoder.final_norm.weight",
        "lm_head.weight": "decoder.embed_tokens.weight" if cfg.tied_output else "lm_head.weight",
        theirs + "self_attn.rotary_emb.inv_freq": None,  # recomputed
        theirs + "input_layernorm.weight": ours + "self_attn_norm.weight",
        theirs + "post_attention_layernorm.weight": ours + "ffn_norm.weight",
        theirs + "self_attn.qkv_proj.weight": (tuple(ours + f"self_attn.{x}_proj.weight" for x in "qkv"), split_qkv(cfg)),
        theirs + "self_attn.o_proj.weight": ours + "self_attn.o_proj.weight",
        theirs + "mlp.gate_up_proj.weight": ((ours + "ffn.gate.weight", ours + "ffn.up.weight"), split(2)),
        theirs + "mlp.down_proj.weight": ours + "ffn.down.weight",
    }
    return optional_prefix("model.", names)
