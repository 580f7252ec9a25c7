"""GPT-2 (Radford et al. 2019): learned positions, pre-norm LayerNorm, GELU (tanh), biases.

GPT-2 stores its projections as Conv1D, whose weight is the transpose of a Linear's, and
fuses q, k and v into one `c_attn`; the hub's original files lack the "transformer." prefix.
"""

from __future__ import annotations

from llmcli.config import ModelConfig
from llmcli.convert.common import activation, is_tied, optional_prefix, require, split, token_ids, transpose

MODEL_TYPES = ("gpt2",)
ARCHITECTURES = ("GPT2LMHeadModel",)
TASK = "generate"


def config(hf: dict, tensors: dict, gen: dict) -> ModelConfig:
    where = "config.json"
    require(hf, where, add_cross_attention=False, scale_attn_by_inverse_layer_idx=False, scale_attn_weights=True)
    ids = token_ids(hf, gen)
    embed = "transformer.wte.weight" if "transformer.wte.weight" in tensors else "wte.weight"
    return ModelConfig(
        architecture="decoder-only", vocab_size=hf["vocab_size"], d_model=hf["n_embd"], n_heads=hf["n_head"],
        n_encoder_layers=0, n_decoder_layers=hf["n_layer"], d_ff=hf.get("n_inner") or 4 * hf["n_embd"],
        activation=activation(hf.get("activation_function", "gelu_new"), where), norm="layernorm",
        norm_position="pre", norm_eps=hf.get("layer_norm_epsilon", 1e-5), positions="learned",
        max_positions=hf["n_positions"], dropout=hf.get("resid_pdrop", 0.1), attention_dropout=hf.get("attn_pdrop", 0.1),
        tied_output=is_tied(tensors, "lm_head.weight", embed), bias=True,
        pad_id=ids["pad"], bos_id=ids["bos"], eos_id=ids["eos"],
    )  # fmt: skip


def weight_map(hf: dict, cfg: ModelConfig) -> dict:
    layer = "decoder.layers.{}."
    qkv = tuple(layer + f"self_attn.{x}_proj" for x in "qkv")
    return optional_prefix("transformer.", {
        "transformer.wte.weight": "decoder.embed_tokens.weight",
        "transformer.wpe.weight": "decoder.embed_positions.weight",
        "transformer.h.{}.ln_1.weight": layer + "self_attn_norm.weight",
        "transformer.h.{}.ln_1.bias": layer + "self_attn_norm.bias",
        "transformer.h.{}.attn.c_attn.weight": (tuple(n + ".weight" for n in qkv), split(3, transpose)),
        "transformer.h.{}.attn.c_attn.bias": (tuple(n + ".bias" for n in qkv), split(3)),
        "transformer.h.{}.attn.c_proj.weight": (layer + "self_attn.o_proj.weight", transpose),
        "transformer.h.{}.attn.c_proj.bias": layer + "self_attn.o_proj.bias",
        "transformer.h.{}.attn.bias": None,  # the causal mask, saved as a buffer by old versions
        "transformer.h.{}.attn.masked_bias": None,
        "transformer.h.{}.ln_2.weight": layer + "ffn_norm.weight",
        "transformer.h.{}.ln_2.bias": layer + "ffn_norm.bias",
        "transformer.h.{}.mlp.c_fc.weight": (layer + "ffn.up.weight", transpose),
        "transformer.h.{}.mlp.c_fc.bias": layer + "ffn.up.bias",
        "transformer.h.{}.mlp.c_proj.weight": (layer + "ffn.down.weight", transpose),
        "transformer.h.{}.mlp.c_proj.bias": layer + "ffn.down.bias",
        "transformer.ln_f.weight": "decoder.final_norm.weight",
        "transformer.ln_f.bias": "decoder.final_norm.bias",
        "lm_head.weight": "decoder.embed_tokens.weight" if cfg.tied_output else "lm_head.weight",
    })  # fmt: skip
