"""BERT-style encoders (Devlin et al. 2019) with a span-prediction head, for extractive QA:
learned positions and token types summed, then LayerNorm; post-norm layers; GELU; biases.
The QA head (`qa_outputs`) gives a start and an end logit per token.
"""

from __future__ import annotations

from llmcli.config import ModelConfig
from llmcli.convert.common import activation, optional_prefix, require

MODEL_TYPES = ("bert",)
ARCHITECTURES = ("BertForQuestionAnswering",)
TASK = "qa"


def config(hf: dict, tensors: dict, gen: dict) -> ModelConfig:
    where = "config.json"
    require(hf, where, position_embedding_type="absolute", is_decoder=False, add_cross_attention=False)
    pad = hf.get("pad_token_id") or 0
    return ModelConfig(
        architecture="encoder-only", head="span", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
        n_heads=hf["num_attention_heads"], n_encoder_layers=hf["num_hidden_layers"], n_decoder_layers=0,
        d_ff=hf["intermediate_size"], activation=activation(hf.get("hidden_act", "gelu"), where), norm="layernorm",
        norm_position="post", norm_eps=hf.get("layer_norm_eps", 1e-12), embedding_norm=True, final_norm=False,
        positions="learned", max_positions=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 2), dropout=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.1), bias=True,
        pad_id=pad, bos_id=pad, eos_id=pad,  # unused: the tokenizer's template adds [CLS] and [SEP]
    )  # fmt: skip


def weight_map(hf: dict, cfg: ModelConfig) -> dict:
    theirs, ours = "bert.encoder.layer.{}.", "encoder.layers.{}."
    names = {
        "bert.embeddings.word_embeddings.weight": "encoder.embed_tokens.weight",
        "bert.embeddings.position_embeddings.weight": "encoder.embed_positions.weight",
        "bert.embeddings.token_type_embeddings.weight": "encoder.embed_types.weight",
        "bert.embeddings.position_ids": None,  # buffers some versions saved
        "bert.embeddings.token_type_ids": None,
        "bert.pooler.dense.weight": None,  # the sentence-classification pooler; QA does not use it
        "bert.pooler.dense.bias": None,
    }
    for p in ("weight", "bias"):
        names[f"bert.embeddings.LayerNorm.{p}"] = f"encoder.embedding_norm.{p}"
        for a, b in (("query", "q"), ("key", "k"), ("value", "v")):
            names[theirs + f"attention.self.{a}.{p}"] = ours + f"self_attn.{b}_proj.{p}"
        names[theirs + f"attention.output.dense.{p}"] = ours + f"self_attn.o_proj.{p}"
        names[theirs + f"attention.output.LayerNorm.{p}"] = ours + f"self_attn_norm.{p}"
        names[theirs + f"intermediate.dense.{p}"] = ours + f"ffn.up.{p}"
        names[theirs + f"output.dense.{p}"] = ours + f"ffn.down.{p}"
        names[theirs + f"output.LayerNorm.{p}"] = ours + f"ffn_norm.{p}"
        names[f"qa_outputs.{p}"] = f"span_head.{p}"
    return optional_prefix("bert.", names)
