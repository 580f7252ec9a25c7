"""llmcli.fast's fused products: self-attention's q, k, v as one product, a gated feed-forward's
gate and up as one, cross-attention's k, v over the memory as one. They give the logits the
separate products give, at every precision, with and without biases, and leave the parameters,
their ties and the state dict as loaded."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from llmcli import device, fast
from llmcli.cache import PAD_TOKEN
from llmcli.config import ModelConfig
from llmcli.model import Transformer

BASE = dict(vocab_size=128, d_model=64, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, d_ff=128, max_positions=64,
            dropout=0.0)  # fmt: skip  # 64, 128: multiples of int4's group and of 16, so int4 takes every layer
DECODER = dict(architecture="decoder-only", n_encoder_layers=0)
SHAPES = {
    "llama-gqa": dict(DECODER, positions="rope", n_kv_heads=2, activation="silu", glu=True, norm="rmsnorm", bias=False),
    "qwen2-qkv-bias": dict(
        DECODER, positions="rope", n_kv_heads=2, activation="silu", glu=True, norm="rmsnorm", bias=False, qkv_bias=True
    ),  # fmt: skip
    "gpt2-bias": dict(DECODER, positions="learned", activation="gelu_tanh", bias=True),
    "marian-bias": dict(positions="sinusoidal", activation="silu", bias=True, scale_embeddings=True),
}
# tests/test_precision.py's bounds on ||logits - fp32's|| / ||fp32's - their mean||.
TOLERANCE = {"bf16": 0.04, "int8": 0.08, "int4": 0.3}
# Fused against separate products: int8 and int4 quantize the same input with the same scales (measured:
# equal to the bit); bf16 rounds the gate's product before the activation, not after (measured ~0.008).
FUSED_TOLERANCE = {"bf16": 0.02, "int8": 1e-3, "int4": 1e-3}
PROMPTS = torch.tensor([[5, 9, 13, 40, 7], [PAD_TOKEN, PAD_TOKEN, 60, 90, 11], [20, 21, 22, 23, 24]])
NEXT = torch.tensor([[30, 31, 32], [33, 34, 35], [36, 37, 38]])  # fed one a step after the prompt


def build(shape: str) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**dict(BASE, **SHAPES[shape]))).eval()
    with torch.no_grad():  # larger than the default init: logits that differ between tokens; biases not zero
        for m in model.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                m.weight.normal_(0, 0.07)
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.1)
    return model


def step_logits(model: Transformer) -> torch.Tensor:
    """The logits of a left-padded prompt's step and of three one-token steps after it, (4, B, V)."""
    with torch.inference_mode():
        if model.cfg.is_encoder_decoder:
            src = PROMPTS.clamp(min=4)
            mask = PROMPTS != PAD_TOKEN
            cache = model.new_cache(3, model.encode(src, mask), mask)
            out = [model.step(torch.full((3, 1), model.cfg.start_id), cache)]
        else:
            cache = model.new_cache(3)
            out = [model.step(PROMPTS, cache)]
        out += [model.step(NEXT[:, i : i + 1], cache) for i in range(NEXT.shape[1])]
    return torch.stack(out)


def relative_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return float((logits - reference).norm() / (reference - reference.mean(-1, keepdim=True)).norm())


def unfused(model: Transformer, precision: str, monkeypatch) -> torch.Tensor:
    with monkeypatch.context() as m:
        m.setattr(fast, "fused_product", lambda *args: None)
        return step_logits(fast.prepare(copy.deepcopy(model), precision))


def fused_groups(model: Transformer) -> dict[str, object]:
    """What each fused group multiplies with, by module and group: {"decoder.layers.0.self_attn qkv_packed": derived}."""
    return {f"{name} {key}": made[2] for name, m in model.named_modules() for key, made in m.__dict__.get("_fused", {}).items()}


@pytest.mark.parametrize("min_weight", [fast.ONEDNN_MIN_WEIGHT, 1], ids=["small-F.linear", "packed-oneDNN"])
@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_fused_logits_equal_the_separate_products(shape, min_weight, monkeypatch):
    monkeypatch.setattr(fast, "ONEDNN_MIN_WEIGHT", min_weight)
    base = build(shape)
    with torch.inference_mode():
        plain = step_logits(base)  # nn.Linear, SDPA: the model as written
    reference = unfused(base, "fp32", monkeypatch)
    model = fast.prepare(copy.deepcopy(base), "fp32")
    logits = step_logits(model)
    torch.testing.assert_close(logits, reference, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(logits, plain, atol=2e-5, rtol=1e-5)
    assert logits.argmax(-1).equal(plain.argmax(-1))
    groups = fused_groups(model)
    kernel = "_plain" if min_weight > 1 else "_packed"
    expected = {"qkv"} | ({"gate_up"} if base.cfg.glu else set()) | ({"kv"} if base.cfg.is_encoder_decoder else set())
    assert {key.split()[1].removesuffix(kernel) for key, made in groups.items() if made is not None} == expected
    if min_weight == 1:
        assert not fast.fallbacks(model)


@pytest.mark.parametrize("precision", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("shape", SHAPES)
def test_lower_precisions_fused_stay_within_their_bounds(shape, precision, monkeypatch):
    if precision == "bf16" and not device.cpu_has_bf16():
        pytest.skip("this CPU has no avx512_bf16 or amx_bf16")
    monkeypatch.setattr(fast, "ONEDNN_MIN_WEIGHT", 1)  # bf16: every product through oneDNN, as in a real model
    base = build(shape)
    fp32 = unfused(base, "fp32", monkeypatch)
    separate = unfused(base, precision, monkeypatch)
    model = fast.prepare(copy.deepcopy(base), precision)
    logits = step_logits(model)
    assert logits.dtype == torch.float32
    assert 0 < relative_error(logits, fp32) < TOLERANCE[precision]  # the lower precision ran, as closely as unfused
    assert relative_error(logits, separate) < FUSED_TOLERANCE[precision], relative_error(logits, separate)
    if precision != "bf16":
        assert not fast.fallbacks(model)  # every product, fused ones included, on int8's or int4's kernel


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
@pytest.mark.parametrize("shape", ["llama-gqa", "marian-bias"])
def test_state_dict_and_ties_stay_as_loaded(shape, precision, monkeypatch):
    monkeypatch.setattr(fast, "ONEDNN_MIN_WEIGHT", 1)
    model = build(shape)
    before = {k: (v.clone(), v.data_ptr()) for k, v in model.state_dict().items()}
    tied = model.lm_head.weight is model.decoder.embed_tokens.weight
    fast.prepare(model, precision)
    step_logits(model)
    step_logits(model)  # the derived weights reused, not made again beside the first ones
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, (value, pointer) in before.items():
        assert after[name].data_ptr() == pointer and torch.equal(after[name], value), name
    assert (model.lm_head.weight is model.decoder.embed_tokens.weight) == tied
    assert not any("fused" in name or "qkv" in name for name, _ in model.named_parameters())
    assert sum(made is not None for made in fused_groups(model).values()) == len(fused_groups(model))
    attn = model.decoder.layers[0].self_attn
    assert not any(k in part.__dict__ for part in (attn.q_proj, attn.k_proj, attn.v_proj) for k in ("_packed", "_int8", "_int4"))
    pickle.loads(pickle.dumps(model))  # oneDNN's and fbgemm's opaque copies stay behind
    copy.deepcopy(model)


def test_a_changed_weight_is_seen_by_the_fused_product(monkeypatch):
    monkeypatch.setattr(fast, "ONEDNN_MIN_WEIGHT", 1)
    model = fast.prepare(build("qwen2-qkv-bias"))
    step_logits(model)
    attn = model.decoder.layers[0].self_attn
    with torch.no_grad():  # in place, as a training step or load_state_dict does
        attn.k_proj.weight.mul_(2.0)
        attn.v_proj.bias.add_(1.0)
        model.decoder.layers[1].ffn.up.weight.mul_(-1.0)
    torch.testing.assert_close(step_logits(model), unfused(model, "fp32", monkeypatch), atol=2e-5, rtol=1e-5)


def test_training_a_prepared_model_runs_the_separate_products(monkeypatch):
    monkeypatch.setattr(fast, "ONEDNN_MIN_WEIGHT", 1)
    model = fast.prepare(build("llama-gqa")).train()
    tokens = PROMPTS.clamp(min=4)
    model(tokens).sum().backward()
    attn = model.decoder.layers[0].self_attn
    assert all(p.weight.grad is not None for p in (attn.q_proj, attn.k_proj, attn.v_proj, model.decoder.layers[0].ffn.gate))
    assert not fused_groups(model)
