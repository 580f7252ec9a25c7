"""Training's speed tricks (llmcli.fast.prepare_training, smoothed_cross_entropy) compute what
the plain model and F.cross_entropy compute."""

import pytest
import torch
import torch.nn.functional as F

from llmcli.config import preset
from llmcli.data import IGNORE_INDEX
from llmcli.fast import TrainingAttention, TrainingDropout, prepare_training, smoothed_cross_entropy
from llmcli.model import Attention, Transformer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_smoothed_cross_entropy_matches_torch(dtype, smoothing):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(300, 517, generator=g) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, 517, (300,), generator=g)
    labels[::7] = IGNORE_INDEX
    expected = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, label_smoothing=smoothing, reduction="sum")
    (expected * 0.5).backward()
    expected_grad, logits.grad = logits.grad, None
    got = smoothed_cross_entropy(logits, labels, smoothing, IGNORE_INDEX)
    (got * 0.5).backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-3)
    assert logits.grad.dtype == dtype
    tolerance = {"rtol": 0, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 0, "atol": 4e-3}
    torch.testing.assert_close(logits.grad.float(), expected_grad.float(), **tolerance)
    assert logits.grad[::7].abs().max() == 0  # ignored rows get no gradient


def test_smoothed_cross_entropy_all_ignored_is_zero():
    logits = torch.randn(4, 10, requires_grad=True)
    loss = smoothed_cross_entropy(logits, torch.full((4,), IGNORE_INDEX), 0.1, IGNORE_INDEX)
    loss.backward()
    assert loss.item() == 0 and logits.grad.abs().max() == 0


def test_training_dropout_drops_p_of_every_position_and_rescales():
    torch.manual_seed(0)
    dropout = TrainingDropout(0.1)
    x = torch.ones(1000, 1003)  # not a multiple of 4: the last word is cut
    y = dropout(x)
    dropped = y == 0
    kept_scale = 65536 / (65536 - round(0.1 * 65536))  # for p as rounded, so E[y] = x exactly
    torch.testing.assert_close(y[~dropped], torch.full_like(y[~dropped], kept_scale))
    assert abs(dropped.float().mean().item() - 0.1) < 0.002
    # each of the four 16-bit lanes of a 64-bit word drops at the same rate (an unbounded
    # random_() would leave one lane's top bit 0 and that lane would never drop)
    lanes = dropped.flatten()[: 1000 * 1000].view(-1, 4).float().mean(0)
    assert (lanes - 0.1).abs().max() < 0.004


@pytest.mark.parametrize("p", [1e-6, 0.999995, 1.0])
def test_training_dropout_leaves_p_that_round_to_0_or_1_to_nn_dropout(p):
    x = torch.ones(1000, 100)
    torch.manual_seed(0)
    expected = torch.nn.Dropout(p)(x)
    torch.manual_seed(0)
    assert torch.equal(TrainingDropout(p)(x), expected)


def test_training_dropout_in_place():
    x = torch.ones(100, 50)
    torch.manual_seed(1)
    y = TrainingDropout(0.5, inplace=True)(x)
    assert y.data_ptr() == x.data_ptr() and set(x.unique().tolist()) == {0.0, 2.0}


def test_smoothed_cross_entropy_ignores_non_finite_logits_of_ignored_rows():
    """fp16 autocast may overflow a padding row's logits: F.cross_entropy never reads them."""
    logits = torch.randn(5, 11)
    logits[1, 3], logits[3] = float("inf"), float("nan")
    labels = torch.tensor([2, IGNORE_INDEX, 7, IGNORE_INDEX, 0])
    logits.requires_grad_()
    loss = smoothed_cross_entropy(logits, labels, 0.1, IGNORE_INDEX)
    loss.backward()
    expected = F.cross_entropy(logits.detach()[[0, 2, 4]], labels[[0, 2, 4]], label_smoothing=0.1, reduction="sum")
    torch.testing.assert_close(loss, expected)
    assert torch.isfinite(logits.grad).all() and logits.grad[[1, 3]].abs().max() == 0


def test_training_dropout_is_seeded_and_backpropagates_its_mask():
    x = torch.randn(64, 33, requires_grad=True)
    dropout = TrainingDropout(0.25)
    torch.manual_seed(3)
    a = dropout(x)
    torch.manual_seed(3)
    b = dropout(x)
    assert torch.equal(a, b)
    a.sum().backward()
    keep = (a != 0).float()
    torch.testing.assert_close(x.grad, keep / 0.75)
    dropout.eval()
    assert torch.equal(dropout(x), x)


def test_prepare_training_keeps_the_model_and_its_state_dict():
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=64, max_positions=32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepare_training(model)
    kinds = {type(m) for m in model.modules()}
    assert TrainingAttention in kinds and TrainingDropout in kinds
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("norm", ["pre", "post"])  # "small", the recipe's, is post-norm
def test_training_attention_under_bf16_autocast_writes_the_product_out(monkeypatch, norm):
    """The same loss and gradients as the plain model (SDPA) under autocast, up to bf16 rounding;
    training does not call SDPA at all, and validation (no grad) still does."""
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=64, max_positions=32, norm_position=norm)
    plain = Transformer(cfg).eval()
    fast = prepare_training(Transformer(cfg)).eval()
    fast.load_state_dict(plain.state_dict())
    src = torch.randint(3, 64, (4, 9))
    tokens = torch.randint(3, 64, (4, 7))
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[0, 6:] = False
    losses = []
    for model in (plain, fast):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(tokens, src, mask)
        loss = logits.float().logsumexp(-1).mean()
        loss.backward()
        losses.append((loss, [p.grad for p in model.parameters()]))
    torch.testing.assert_close(losses[1][0], losses[0][0], rtol=2e-2, atol=2e-2)
    for a, b in zip(losses[0][1], losses[1][1], strict=True):
        torch.testing.assert_close(b, a, rtol=0.1, atol=0.02)

    sdpa_calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: sdpa_calls.append(1) or sdpa(*a, **k))  # fmt: skip
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast(tokens, src, mask).float().sum().backward()
    assert sdpa_calls == []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast(tokens, src, mask)
    assert len(sdpa_calls) == cfg.n_encoder_layers + 2 * cfg.n_decoder_layers


@pytest.mark.parametrize("case", ["padding mask", "causal", "float bias", "grouped kv"])
def test_attention_written_out_equals_sdpa(case):
    """`Attention.attend_written_out` against SDPA in float32, for the masks the model makes."""
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=64, max_positions=32)
    attention = Attention(cfg).eval()
    B, H, T, D = 3, cfg.n_heads, 7, cfg.head_dim
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    mask, is_causal = None, False
    if case == "padding mask":
        mask = torch.ones(B, 1, 1, T, dtype=torch.bool)
        mask[0, ..., 4:] = False
    elif case == "causal":
        is_causal = True
    elif case == "float bias":
        mask = torch.randn(B, H, T, T)
    else:  # what attend passes on after repeating grouped key/value heads: equal shapes
        k, v = k[:, :1].expand(B, H, T, D), v[:, :1].expand(B, H, T, D)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    torch.testing.assert_close(attention.attend_written_out(q, k, v, mask, is_causal), expected)


def test_training_attention_keeps_float32_sdpa_for_long_sequences(monkeypatch):
    from llmcli.fast import WRITTEN_OUT_MAX_TOKENS

    torch.manual_seed(0)
    T = WRITTEN_OUT_MAX_TOKENS + 2
    cfg = preset("tiny", vocab_size=64, max_positions=2 * T)
    model = prepare_training(Transformer(cfg))
    seen = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, *a, **k: seen.append(q.dtype) or sdpa(q, *a, **k))
    for length in (T, 20):
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(
                torch.randint(3, 64, (2, length)), torch.randint(3, 64, (2, length)), torch.ones(2, length, dtype=torch.bool)
            )
        logits.float().sum().backward()
        assert seen == ([torch.float32] * (cfg.n_encoder_layers + 2 * cfg.n_decoder_layers) if length == T else [])


def test_training_attention_with_bf16_parameters_and_no_autocast_stays_bf16():
    torch.manual_seed(0)
    model = prepare_training(Transformer(preset("tiny", vocab_size=64, max_positions=32))).to(torch.bfloat16)
    attention = next(m for m in model.modules() if isinstance(m, TrainingAttention))
    seen = []
    attention.o_proj.register_forward_hook(lambda module, args, out: seen.append(args[0].dtype))
    src, tokens = torch.randint(3, 64, (2, 9)), torch.randint(3, 64, (2, 7))
    model(tokens, src, torch.ones(2, 9, dtype=torch.bool)).float().sum().backward()
    assert seen == [torch.bfloat16]
