import copy
import pickle

import pytest
import torch

from llmcli import fast
from llmcli.cache import PAD_TOKEN
from llmcli.checkpoint import build_for_loading, skip_init
from llmcli.config import ModelConfig
from llmcli.fast import PackedLinear
from llmcli.model import Transformer

BASE = dict(vocab_size=50, d_model=32, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, d_ff=64, max_positions=64, dropout=0.0)

# One entry per axis of variation, plus the combinations real families use.
VARIANTS = {
    "vaswani": dict(),
    "post-norm": dict(norm_position="post", final_norm=False),
    "learned-bart": dict(positions="learned", position_offset=2, embedding_norm=True, activation="gelu", final_logits_bias=True),
    "rope-gqa-swiglu": dict(positions="rope", n_kv_heads=2, activation="silu", glu=True, norm="rmsnorm", bias=False),
    "t5-relative": dict(
        positions="relative",
        relative_buckets=8,
        relative_max_distance=16,
        norm="rmsnorm",
        bias=False,
        attention_scale=1.0,
        activation="gelu_tanh",
        glu=True,
        logits_scale=32**-0.5,
    ),
    "separate-vocab": dict(tgt_vocab_size=40, shared_embeddings=False, tied_output=False, scale_embeddings=True),
    "qwen2-qkv-bias": dict(
        positions="rope", n_kv_heads=2, activation="silu", glu=True, norm="rmsnorm", bias=False, qkv_bias=True
    ),
    "qwen3-qk-norm": dict(positions="rope", d_head=16, activation="silu", glu=True, norm="rmsnorm", bias=False, qk_norm=True),
    # a window shorter than the prompts and the 40 tokens decoded: keys leave it while decoding
    "mistral-window": dict(
        positions="rope", n_kv_heads=2, activation="silu", glu=True, norm="rmsnorm", bias=False, sliding_window=4
    ),
    "gemma": dict(
        positions="rope",
        d_head=16,
        activation="gelu_tanh",
        glu=True,
        norm="rmsnorm",
        bias=False,
        norm_weight_offset=1.0,
        scale_embeddings=True,
    ),
}


def build(arch: str, kernels: str = "plain", **fields) -> Transformer:
    """A tiny model; with kernels="fast", prepared by llmcli.fast, every linear layer packed
    (however small) and the feed-forward activation fused into it."""
    kw = dict(BASE, **fields)
    if arch == "decoder-only":
        kw.update(architecture="decoder-only", n_encoder_layers=0)
        kw.pop("tgt_vocab_size", None)
        kw["shared_embeddings"] = True
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**kw)).eval()
    return fast.prepare(model) if kernels == "fast" else model


KERNELS = ["plain", "fast"]


@pytest.fixture(autouse=True)
def _pack_every_weight(monkeypatch):
    monkeypatch.setattr(fast, "ONEDNN_MIN_WEIGHT", 1)  # the packed path, small as the layers are


def random_src(model, B=3, S=7):
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, model.cfg.vocab_size, (B, S), generator=g)
    lengths = torch.tensor([S, S - 3, 2])[:B]
    mask = torch.arange(S)[None, :] < lengths[:, None]
    return src.masked_fill(~mask, model.cfg.pad_id), mask


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", ["encoder-decoder", "decoder-only"])
@pytest.mark.parametrize("kernels", KERNELS)
def test_incremental_decoding_matches_full_forward(arch, variant, kernels):
    model = build(arch, kernels, **VARIANTS[variant])
    V = model.cfg.output_vocab_size
    # 40 tokens: past the room the key/value buffers are first made with, twice
    tokens = torch.randint(4, V, (3, 40), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        if arch == "encoder-decoder":
            src, src_mask = random_src(model)
            full = model(tokens, src, src_mask)
            cache = model.new_cache(3, model.encode(src, src_mask), src_mask)
        else:
            full = model(tokens)
            cache = model.new_cache(3)
        # Prime with a 3-token chunk, then one token at a time.
        steps = [model.step(tokens[:, :3], cache)]
        for t in range(3, tokens.shape[1]):
            steps.append(model.step(tokens[:, t : t + 1], cache))
    incremental = torch.stack(steps, 1)  # (B, 38, V)
    torch.testing.assert_close(incremental, full[:, 2:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kernels", KERNELS)
def test_left_padded_prompts_match_unpadded(variant, kernels):
    model = build("decoder-only", kernels, **VARIANTS[variant])
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    width = max(map(len, prompts))
    batch = torch.tensor([[PAD_TOKEN] * (width - len(p)) + p for p in prompts])
    with torch.inference_mode():
        cache = model.new_cache(3)
        batched = [model.step(batch, cache)]
        nxt = torch.tensor([[20], [21], [22]])
        batched.append(model.step(nxt, cache))
        for i, p in enumerate(prompts):
            alone = model.new_cache(1)
            first = model.step(torch.tensor([p]), alone)
            second = model.step(nxt[i : i + 1], alone)
            torch.testing.assert_close(batched[0][i], first[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(batched[1][i], second[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_source_padding_does_not_leak_across_batch(variant):
    model = build("encoder-decoder", **VARIANTS[variant])
    src, src_mask = random_src(model)
    tgt = torch.randint(4, model.cfg.output_vocab_size, (3, 5), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        batched = model(tgt, src, src_mask)
        for i in range(3):
            n = int(src_mask[i].sum())
            alone = model(tgt[i : i + 1], src[i : i + 1, :n], src_mask[i : i + 1, :n])
            torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", ["encoder-decoder", "decoder-only"])
def test_causal_mask_future_tokens_never_change_earlier_logits(arch, variant):
    model = build(arch, **VARIANTS[variant])
    tokens = torch.randint(4, model.cfg.output_vocab_size, (2, 8), generator=torch.Generator().manual_seed(4))
    changed = tokens.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % model.cfg.output_vocab_size
    args = random_src(model, B=2) if arch == "encoder-decoder" else ()
    with torch.inference_mode():
        a, b = model(tokens, *args), model(changed, *args)
    torch.testing.assert_close(a[:, :5], b[:, :5], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 5:], b[:, 5:])


@pytest.mark.parametrize("kernels", KERNELS)
def test_cache_select_reorders_rows(kernels):
    model = build("encoder-decoder", kernels)
    src, src_mask = random_src(model)
    tokens = torch.full((3, 1), model.cfg.start_id)
    with torch.inference_mode():
        cache = model.new_cache(3, model.encode(src, src_mask), src_mask)
        model.step(tokens, cache)
        cache.select(torch.tensor([2, 2, 0]))
        out = model.step(torch.tensor([[7], [7], [7]]), cache)
        ref = model.new_cache(3, model.encode(src, src_mask), src_mask)
        model.step(tokens, ref)
        expected = model.step(torch.tensor([[7], [7], [7]]), ref)
    torch.testing.assert_close(out, expected[[2, 2, 0]], atol=1e-6, rtol=0)


def test_tiny_model_overfits_a_tiny_batch():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**BASE))
    src = torch.randint(4, 50, (4, 6))
    src_mask = torch.ones_like(src, dtype=torch.bool)
    tgt = torch.randint(4, 50, (4, 7))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        logits = model(tgt[:, :-1], src, src_mask)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), tgt[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_tied_parameters_are_one_tensor():
    model = build("encoder-decoder")
    assert model.lm_head.weight is model.decoder.embed_tokens.weight is model.encoder.embed_tokens.weight
    untied = build("encoder-decoder", **VARIANTS["separate-vocab"])
    assert untied.lm_head.weight.shape == (40, 32) and untied.encoder.embed_tokens.weight.shape == (50, 32)


@pytest.mark.parametrize("kernels", KERNELS)
def test_beams_read_their_sentence_memory_without_copying_it(kernels):
    model = build("encoder-decoder", kernels)
    src, src_mask = random_src(model)
    K = 4
    with torch.inference_mode():
        cache = model.new_cache(3, model.encode(src, src_mask), src_mask)
        model.step(torch.full((3, 1), model.cfg.start_id), cache)
        memory = cache.cross_kv[0][0]
        cache.select(torch.arange(3).repeat_interleave(K))  # expand each sentence to K beams
        assert cache.memory_group == K and cache.cross_kv[0][0] is memory
        reorder = torch.tensor([1, 0, 0, 2, 4, 4, 5, 7, 8, 9, 10, 11])  # beams swap within their sentence
        cache.select(reorder)
        assert cache.memory_group == K and cache.cross_kv[0][0] is memory
        tokens = torch.arange(4, 4 + 3 * K)[:, None]
        grouped = model.step(tokens, cache)

        # The same rows with the memory copied per beam, as a cache without groups holds it.
        expand = torch.arange(3).repeat_interleave(K)
        ref = model.new_cache(3 * K, model.encode(src[expand], src_mask[expand]), src_mask[expand])
        model.step(torch.full((3 * K, 1), model.cfg.start_id), ref)
        ref.select(reorder)
        assert ref.memory_group == 1
        expected = model.step(tokens, ref)
        torch.testing.assert_close(grouped, expected, atol=1e-5, rtol=0)

        # The second sentence finishes: its memory row leaves, the others stay grouped.
        keep = torch.tensor([0, 1, 2, 3, 8, 9, 10, 11])
        cache.select(keep)
        ref.select(keep)
        assert cache.memory_group == K and cache.cross_kv[0][0].shape[0] == 2
        torch.testing.assert_close(model.step(tokens[keep], cache), model.step(tokens[keep], ref), atol=1e-5, rtol=0)


def test_inference_linear_matches_linear_and_follows_weight_changes(monkeypatch):
    torch.manual_seed(0)
    layer = PackedLinear(24, 40)
    x = torch.randn(5, 3, 24)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=0)
    with torch.no_grad():
        layer.weight.mul_(2.0)  # a training step or a load_state_dict changes weights in place
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=0)
    y = layer(x)  # with autograd: the plain path, gradients flow
    y.sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.shape == (40, 24)
    # Short of memory: no packed copy, the same numbers through F.linear.
    monkeypatch.setattr(fast, "_memory_allows", lambda nbytes: False)
    small = PackedLinear(24, 8)
    with torch.inference_mode():
        torch.testing.assert_close(small(x), torch.nn.functional.linear(x, small.weight, small.bias), atol=1e-5, rtol=0)
    if fast._onednn_enabled:
        assert small.__dict__["_packed"][2] is None
    copy.deepcopy(layer)  # a packed copy is not state: copies and pickles leave it behind
    pickle.loads(pickle.dumps(layer))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", ["encoder-decoder", "decoder-only"])
def test_a_model_built_for_loading_computes_what_the_original_does(arch, variant):
    from llmcli.checkpoint import load_state_into, model_tensors

    original = build(arch, **VARIANTS[variant])
    loaded = build_for_loading(original.cfg)  # no random init: every weight comes from the checkpoint
    load_state_into(loaded, {k: v.clone() for k, v in model_tensors(original).items()}, "test")
    loaded.eval()
    assert (loaded.lm_head.weight is loaded.decoder.embed_tokens.weight) == original.cfg.tied_output
    tokens = torch.randint(4, original.cfg.output_vocab_size, (3, 9), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        if arch == "encoder-decoder":
            src, src_mask = random_src(original)
            torch.testing.assert_close(loaded(tokens, src, src_mask), original(tokens, src, src_mask), atol=0, rtol=0)
        else:
            torch.testing.assert_close(loaded(tokens), original(tokens), atol=0, rtol=0)


def test_building_for_loading_leaves_other_threads_models_initialised():
    import threading

    inside, release = threading.Event(), threading.Event()

    def loader():
        with skip_init():  # what build_for_loading holds while it builds
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=loader)
    thread.start()
    try:
        assert inside.wait(10)
        torch.manual_seed(0)
        model = Transformer(ModelConfig(**BASE))  # built meanwhile in this thread: initialised as usual
        expected_std = 0.02  # _init_weights' std for linear layers
        for name, p in model.named_parameters():
            assert torch.isfinite(p).all(), name
        assert abs(float(model.encoder.layers[0].ffn.up.weight.detach().std()) - expected_std) < 0.005
    finally:
        release.set()
        thread.join()


def test_decoding_a_step_run_in_inference_mode_from_outside_it():
    from llmcli.decoding import beam_search, greedy_search

    model = build("decoder-only")
    start = torch.tensor([[5, 6, 7], [PAD_TOKEN, 8, 9]])
    step = torch.inference_mode()(model.step)  # its logits can only be changed in inference mode
    greedy = greedy_search(step, model.new_cache(2), start, eos_id=2, max_new_tokens=6, min_new_tokens=2)
    beams = beam_search(step, model.new_cache(2), start, beam_size=3, eos_id=2, max_new_tokens=6, min_new_tokens=2)
    with torch.inference_mode():
        expected = greedy_search(model.step, model.new_cache(2), start, eos_id=2, max_new_tokens=6, min_new_tokens=2)
    assert [h.tokens for h in greedy] == [h.tokens for h in expected]
    assert all(len(b) == 1 and len(b[0].tokens) >= 2 for b in beams)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", ["encoder-decoder", "decoder-only", "encoder-only"])
def test_the_config_reckons_the_parameter_count_without_building(arch, variant):
    if arch == "encoder-only":
        fields = dict(BASE, **VARIANTS[variant], architecture="encoder-only", n_decoder_layers=0, head="span", type_vocab_size=2)
        for key in ("tgt_vocab_size", "shared_embeddings", "tied_output", "final_logits_bias"):
            fields.pop(key, None)
        model = Transformer(ModelConfig(**fields))
    else:
        model = build(arch, **VARIANTS[variant])
    assert model.cfg.n_parameters == model.num_parameters()
