"""Gemma 3, text only (Gemma Team 2025): Gemma 2's sandwich norms and local/global layers, plus an
RMSNorm (1 + weight) over each head of q and k, a rope base of their own for the local layers
(10k against the global layers' 1M), rope scaling on the global layers only, no attention
soft-capping (transformers' Gemma 3 passes none, whatever the config says), five local layers to
one global by default.

Read as transformers 5 writes it (`layer_types`, `rope_parameters` per layer type) and 4.x
(`sliding_window_pattern`, `rope_theta`, `rope_local_base_freq`, `rope_scaling`). The multimodal
`gemma3` (Gemma3ForConditionalGeneration) converts to its text model: the config's text_config
(which 4.x files write as differences from Gemma3TextConfig's defaults, filled in here), the
language model's tensors, the vision tower and projector dropped; as transformers runs it, without
the final soft-capping.
"""

from __future__ import annotations

from llmcli.config import ModelConfig
from llmcli.convert import gemma2
from llmcli.errors import UserError

MODEL_TYPES = ("gemma3_text", "gemma3")
ARCHITECTURES = ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")

# Gemma3TextConfig's defaults, for the text_config of a multimodal file that leaves them out
TEXT_DEFAULTS = dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                     num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
                     max_position_embeddings=131_072, rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                     tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096)  # fmt: skip
# SigLIP's tensors (the vision tower) and the projector's, under the prefixes their files use
VISION = ["embeddings.patch_embedding.weight", "embeddings.patch_embedding.bias", "embeddings.position_embedding.weight",
          "post_layernorm.weight", "post_layernorm.bias", "head.probe", "head.attention.in_proj_weight",
          "head.attention.in_proj_bias"] + [f"{m}.{p}" for m in ("head.attention.out_proj", "head.layernorm", "head.mlp.fc1",
          "head.mlp.fc2") for p in ("weight", "bias")] + [f"encoder.layers.{{}}.{m}.{p}" for m in ("layer_norm1",
          "layer_norm2", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
          "mlp.fc2") for p in ("weight", "bias")]  # fmt: skip
PROJECTOR = ["mm_input_projection_weight", "mm_soft_emb_norm.weight"]
TASK = "generate"


def _ropes(hf: dict, where: str) -> tuple[dict, float]:
    """Their config with the global layers' rope as a flat dict (for llama.rope), and the local layers' base."""
    params = hf.get("rope_parameters") or {}
    if isinstance(params.get("full_attention"), dict) or isinstance(params.get("sliding_attention"), dict):
        full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
        local_kind = local.get("rope_type") or local.get("type") or "default"
        if local_kind != "default":
            raise UserError(f"{where}: rotary scaling {local_kind!r} on the sliding-window layers is not supported")
        flat = {**hf, "rope_scaling": None, "rope_parameters": {"rope_theta": 1_000_000.0, **full}}
        return flat, float(local.get("rope_theta") or 10_000.0)
    # 4.x: rope_theta and rope_scaling are the global layers'
    flat = {**hf, "rope_theta": hf.get("rope_theta") or 1_000_000.0}
    return flat, float(hf.get("rope_local_base_freq") or 10_000.0)


def config(hf: dict, tensors: dict, gen: dict) -> ModelConfig:
    where = "config.json"
    if hf.get("model_type") == "gemma3":
        if not isinstance(hf.get("text_config"), dict):
            raise UserError(f"{where}: a gemma3 config without a text_config")
        # transformers' Gemma3ForConditionalGeneration caps no logits, whatever the text_config says
        hf = {**TEXT_DEFAULTS, **hf["text_config"], "final_logit_softcapping": None}
    pattern = hf.get("sliding_window_pattern") or 6  # 4.x files: every pattern-th layer global
    default_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(hf["num_hidden_layers"])]
    flat, local_theta = _ropes(hf, where)
    cfg = gemma2.config({**flat, "attn_logit_softcapping": None}, tensors, gen, default_types)
    return cfg.replace(qk_norm=True, rope_local_theta=local_theta)


def weight_map(hf: dict, cfg: ModelConfig) -> dict:
    names = gemma2.weight_map(hf, cfg)
    for prefix in ("model.", ""):
        for x in "qk":
            names[f"{prefix}layers.{{}}.self_attn.{x}_norm.weight"] = f"decoder.layers.{{}}.self_attn.{x}_norm.weight"
    if hf.get("model_type") != "gemma3":
        return names
    # the text model as files hold it (language_model.model.*, language_model.lm_head) or as
    # transformers 5 names it (model.language_model.*, lm_head)
    both = {("language_model." + k if k.startswith(("model.", "lm_head")) else "model.language_model." + k): v
            for k, v in names.items()}  # fmt: skip
    both["lm_head.weight"] = names["lm_head.weight"]
    for prefix in ("vision_tower.", "vision_tower.vision_model.", "model.vision_tower.", "model.vision_tower.vision_model."):
        both.update({prefix + name: None for name in VISION})  # dropped: llmcli runs the text model
    for prefix in ("multi_modal_projector.", "model.multi_modal_projector."):
        both.update({prefix + name: None for name in PROJECTOR})
    return both
