"""BART (Lewis et al. 2020) and mBART (Liu et al. 2020): learned positions offset by 2, a
LayerNorm on the embeddings, GELU, a bias on the logits, one embedding matrix for
encoder, decoder and output. BART is post-norm; mBART pre-norm with a final LayerNorm
per stack and (mbart-large-cc25) embeddings scaled by sqrt(d_model).
"""

from __future__ import annotations

from llmcli.config import ModelConfig
from llmcli.convert.common import activation, is_tied, optional_prefix, same, token_ids
from llmcli.errors import UserError

MODEL_TYPES = ("bart", "mbart")
ARCHITECTURES = ("BartForConditionalGeneration", "BartModel", "MBartForConditionalGeneration", "MBartModel")


def common_fields(hf: dict, tensors: dict, gen: dict, where: str) -> dict:
    """What BART, mBART and Marian share: one head count and FFN size, their token ids."""
    ids = token_ids(hf, gen)
    heads = same(hf, where, "encoder_attention_heads", "decoder_attention_heads")
    d_ff = same(hf, where, "encoder_ffn_dim", "decoder_ffn_dim")
    if hf.get("encoder_layers") is None or hf.get("decoder_layers") is None:
        raise UserError(f"{where}: encoder_layers and decoder_layers are required")
    return dict(
        architecture="encoder-decoder", d_model=hf["d_model"], n_heads=heads, d_ff=d_ff,
        n_encoder_layers=hf["encoder_layers"], n_decoder_layers=hf["decoder_layers"],
        activation=activation(hf.get("activation_function", "gelu"), where), norm="layernorm", norm_eps=1e-5,
        max_positions=hf.get("max_position_embeddings", 1024), dropout=hf.get("dropout", 0.1),
        attention_dropout=hf.get("attention_dropout", 0.0), scale_embeddings=bool(hf.get("scale_embedding", False)),
        final_logits_bias="model.final_logits_bias" in tensors or "final_logits_bias" in tensors, bias=True,
        pad_id=ids["pad"], bos_id=ids["bos"], eos_id=ids["eos"], decoder_start_id=ids["start"],
    )  # fmt: skip


def config(hf: dict, tensors: dict, gen: dict) -> ModelConfig:
    where = "config.json"
    mbart = hf["model_type"] == "mbart"
    embed = "model.shared.weight" if "model.shared.weight" in tensors else "shared.weight"
    return ModelConfig(
        **common_fields(hf, tensors, gen, where), vocab_size=hf["vocab_size"], positions="learned", position_offset=2,
        embedding_norm=True, norm_position="pre" if mbart else "post", final_norm=mbart,
        shared_embeddings=True, tied_output=is_tied(tensors, "lm_head.weight", embed),
    )  # fmt: skip


def layer_names(side: str, cross: bool) -> dict:
    """One BART/Marian layer: their names under model.{side}.layers.{} to ours under {side}.layers.{}."""
    theirs, ours = f"model.{side}.layers.{{}}.", f"{side}.layers.{{}}."
    attention = [("self_attn", "self_attn")] + ([("encoder_attn", "cross_attn")] if cross else [])
    names = {}
    for p in ("weight", "bias"):
        for a, b in attention:
            for x in "qkv":
                names[theirs + f"{a}.{x}_proj.{p}"] = ours + f"{b}.{x}_proj.{p}"
            names[theirs + f"{a}.out_proj.{p}"] = ours + f"{b}.o_proj.{p}"
            names[theirs + f"{a}_layer_norm.{p}"] = ours + f"{b}_norm.{p}"
        names[theirs + f"fc1.{p}"] = ours + f"ffn.up.{p}"
        names[theirs + f"fc2.{p}"] = ours + f"ffn.down.{p}"
        names[theirs + f"final_layer_norm.{p}"] = ours + f"ffn_norm.{p}"
    return names


def embedding_names(cfg: ModelConfig) -> dict:
    shared = "encoder.embed_tokens.weight"  # our first name for the one shared matrix
    if cfg.shared_embeddings:
        names = {"model.shared.weight": shared, "model.encoder.embed_tokens.weight": shared,
                 "model.decoder.embed_tokens.weight": shared}  # fmt: skip
    else:
        names = {"model.encoder.embed_tokens.weight": "encoder.embed_tokens.weight",
                 "model.decoder.embed_tokens.weight": "decoder.embed_tokens.weight"}  # fmt: skip
    target = "decoder.embed_tokens.weight" if not cfg.shared_embeddings else shared
    names["lm_head.weight"] = target if cfg.tied_output else "lm_head.weight"
    names["model.final_logits_bias"] = "final_logits_bias"
    names["final_logits_bias"] = "final_logits_bias"
    return names


def weight_map(hf: dict, cfg: ModelConfig) -> dict:
    names = embedding_names(cfg) | layer_names("encoder", cross=False) | layer_names("decoder", cross=True)
    for side in ("encoder", "decoder"):
        for p in ("weight", "bias"):
            names[f"model.{side}.embed_positions.{p}"] = f"{side}.embed_positions.{p}"
            names[f"model.{side}.layernorm_embedding.{p}"] = f"{side}.embedding_norm.{p}"
            if cfg.final_norm:
                names[f"model.{side}.layer_norm.{p}"] = f"{side}.final_norm.{p}"
    return optional_prefix("model.", names)
