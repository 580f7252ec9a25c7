"""T5 (Raffel et al. 2020) and T5 v1.1: relative-position buckets shared by a stack's layers
(stored in its first layer), RMSNorm before each sublayer, no biases, attention without
1/sqrt(d) (folded into the weights), one embedding matrix. v1 has a ReLU FFN and scales the
tied output by d_model**-0.5; v1.1 a gated-GELU FFN and (on the hub) its own output matrix.
"""

from __future__ import annotations

from llmcli.config import ModelConfig
from llmcli.convert.common import activation, is_tied, token_ids
from llmcli.errors import UserError

MODEL_TYPES = ("t5",)
ARCHITECTURES = ("T5ForConditionalGeneration", "T5Model")


def config(hf: dict, tensors: dict, gen: dict) -> ModelConfig:
    where = "config.json"
    ids = token_ids(hf, gen)
    proj = hf.get("feed_forward_proj", "relu")
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise UserError(f"{where}: feed_forward_proj={proj!r} is not supported")
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]  # as transformers reads old files
    # transformers 5 writes scale_decoder_outputs; older files say tie_word_embeddings=false for v1.1
    scale = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)
    d, heads, d_kv = hf["d_model"], hf["num_heads"], hf["d_kv"]
    return ModelConfig(
        architecture="encoder-decoder", vocab_size=hf["vocab_size"], d_model=d, n_heads=heads,
        d_head=None if d_kv * heads == d else d_kv, n_encoder_layers=hf["num_layers"],
        n_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"], d_ff=hf["d_ff"],
        activation=activation(act, where), glu=len(parts) == 2, norm="rmsnorm", norm_position="pre",
        norm_eps=hf.get("layer_norm_epsilon", 1e-6), positions="relative", max_positions=hf.get("n_positions") or 512,
        relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128), attention_scale=1.0,
        dropout=hf.get("dropout_rate", 0.1), shared_embeddings=True,
        tied_output=is_tied(tensors, "lm_head.weight", "shared.weight"), logits_scale=d**-0.5 if scale else 1.0,
        bias=False, pad_id=ids["pad"], bos_id=ids["bos"], eos_id=ids["eos"], decoder_start_id=ids["start"],
    )  # fmt: skip


def weight_map(hf: dict, cfg: ModelConfig) -> dict:
    shared = "encoder.embed_tokens.weight"
    names = {
        "shared.weight": shared, "encoder.embed_tokens.weight": shared, "decoder.embed_tokens.weight": shared,
        "lm_head.weight": shared if cfg.tied_output else "lm_head.weight",
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": "encoder.relative_bias.embedding.weight",
        "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": "decoder.relative_bias.embedding.weight",
        "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight": None,  # unused, as in transformers
        "encoder.final_layer_norm.weight": "encoder.final_norm.weight",
        "decoder.final_layer_norm.weight": "decoder.final_norm.weight",
    }  # fmt: skip
    for side, sublayers in (("encoder", ("self_attn", "ffn")), ("decoder", ("self_attn", "cross_attn", "ffn"))):
        for i, sub in enumerate(sublayers):
            theirs, ours = f"{side}.block.{{}}.layer.{i}.", f"{side}.layers.{{}}."
            names[theirs + "layer_norm.weight"] = ours + f"{sub}_norm.weight"
            if sub == "ffn":
                ffn = {"wi_0": "gate", "wi_1": "up"} if cfg.glu else {"wi": "up"}
                for a, b in (ffn | {"wo": "down"}).items():
                    names[theirs + f"DenseReluDense.{a}.weight"] = ours + f"ffn.{b}.weight"
            else:
                attention = "SelfAttention" if sub == "self_attn" else "EncDecAttention"
                for x in "qkvo":
                    names[theirs + f"{attention}.{x}.weight"] = ours + f"{sub}.{x}_proj.weight"
    return names
