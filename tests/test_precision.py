"""`--precision fp32|bf16|int8|int4|auto` (llmcli.fast.prepare, llmcli.device.resolve_precision):
fp32 decodes the same tokens as before and as transformers; bf16, int8 and int4 give logits
close to fp32's on tiny random Llama and Marian models, through the library and the CLI, one
output line per input; a CPU without bf16 and an unknown precision are one-line errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from llmcli import decoding, device, fast, tasks  # noqa: E402
from llmcli.cli import app  # noqa: E402
from llmcli.convert import convert_weights  # noqa: E402

V = 128  # a multiple of 16, so int4 quantizes the output layer too
# ||logits - fp32 logits|| / ||fp32 logits - their mean||, over a prompt's step and 3 rows.
# Measured on these models: bf16 ~0.01, int8 ~0.02, int4 ~0.10 (groups of 32, 4 bits: the
# weights' error alone is ~8% a layer); the bounds are about 3x that.
TOLERANCE = {"bf16": 0.04, "int8": 0.08, "int4": 0.3}
needs_bf16 = pytest.mark.skipif(not device.cpu_has_bf16(), reason="this CPU has no avx512_bf16 or amx_bf16")


def _word_tokenizer(directory, config) -> None:
    names = {i: f"w{i}" for i in range(V)}
    names.update({config.bos_token_id: "<s>", config.eos_token_id: "</s>", V - 1: "<unk>"})
    tok = Tokenizer(models.WordLevel({n: i for i, n in names.items()}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast_tok.save_pretrained(directory)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(HF directory, HF model) of a tiny random Llama with tied embeddings."""
    d = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=V, max_position_embeddings=64, bos_token_id=1,
                                   eos_token_id=2, tie_word_embeddings=True)  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger than the default init: peaked, context-dependent predictions
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    model.eval().save_pretrained(d)
    _word_tokenizer(d, cfg)
    return d, model


@pytest.fixture(scope="module")
def marian(tmp_path_factory):
    d = tmp_path_factory.mktemp("marian")
    torch.manual_seed(0)
    cfg = transformers.MarianConfig(vocab_size=V, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                                    decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                                    max_position_embeddings=64, pad_token_id=V - 1, eos_token_id=0,
                                    decoder_start_token_id=V - 1, forced_eos_token_id=None, activation_function="swish")  # fmt: skip
    transformers.MarianMTModel(cfg).eval().save_pretrained(d)
    return d


PROMPTS = torch.tensor([[5, 9, 13, 40, 7], [3, 3, 60, 90, 11], [20, 21, 22, 23, 24]])


def _step_logits(model) -> torch.Tensor:
    with torch.inference_mode():
        if model.cfg.is_encoder_decoder:
            mask = torch.ones_like(PROMPTS, dtype=torch.bool)
            cache = model.new_cache(3, model.encode(PROMPTS, mask), mask)
            return model.step(torch.full((3, 1), model.cfg.start_id), cache)
        return model.step(PROMPTS, model.new_cache(3))


def _relative_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return float((logits - reference).norm() / (reference - reference.mean(-1, keepdim=True)).norm())


def test_fp32_is_unchanged_and_matches_transformers(llama):
    d, hf = llama
    base = convert_weights(d)
    before, now = fast.prepare(copy.deepcopy(base)), fast.prepare(copy.deepcopy(base), "fp32")
    common = dict(eos_id=2, max_new_tokens=8, min_new_tokens=8)  # eos banned: every row has 8 tokens
    with torch.inference_mode():
        ours = [h.tokens for h in decoding.greedy_search(now.step, now.new_cache(3), PROMPTS, **common)]
        old = [h.tokens for h in decoding.greedy_search(before.step, before.new_cache(3), PROMPTS, **common)]
        theirs = hf.generate(input_ids=PROMPTS, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=2)
    assert ours == old == theirs[:, PROMPTS.shape[1] :].tolist()
    assert all(type(m) is fast.PackedLinear for m in now.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("precision", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("family", ["llama", "marian"])
def test_logits_close_to_fp32(precision, family, llama, marian):
    if precision == "bf16" and not device.cpu_has_bf16():
        pytest.skip("this CPU has no avx512_bf16 or amx_bf16")
    base = convert_weights(llama[0] if family == "llama" else marian)
    reference = _step_logits(fast.prepare(copy.deepcopy(base)))
    model = fast.prepare(copy.deepcopy(base), precision)
    logits = _step_logits(model)
    assert logits.dtype == torch.float32  # softmax, log-probabilities and scores read float32
    error = _relative_error(logits, reference)
    assert error < TOLERANCE[precision], error
    assert error > 0  # the lower precision really ran
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if precision == "bf16":
        assert all(m.weight.dtype == torch.bfloat16 for m in linears)
    else:
        kind = {"int8": fast.Int8Linear, "int4": fast.Int4Linear}[precision]
        assert all(type(m) is kind for m in linears)
        assert not fast.fallbacks(model)  # none fell back, the fused q/k/v and gate/up products included
    assert base.state_dict().keys() == model.state_dict().keys()


def test_int8_weight_only_fallback_close(llama, monkeypatch):
    """The kernel a torch without fbgemm (quantized tensors deprecated) falls back to."""
    if not device.cpu_has_bf16():
        pytest.skip("bf16 activations are slow without avx512_bf16; the fallback is for newer torches")
    monkeypatch.setattr(fast, "INT8_KERNEL", "weight-only")
    base = convert_weights(llama[0])
    reference = _step_logits(fast.prepare(copy.deepcopy(base)))
    assert _relative_error(_step_logits(fast.prepare(copy.deepcopy(base), "int8")), reference) < TOLERANCE["int8"]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("precision", ["bf16", "int8", "int4"])
def test_cli_generate_one_line_per_input(precision, llama, tmp_path):
    if precision == "bf16" and not device.cpu_has_bf16():
        pytest.skip("this CPU has no avx512_bf16 or amx_bf16")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w5 w9 w13\n\nw40 w41\n", encoding="utf-8")
    result = run("generate", "-m", llama[0], "--input", prompts, "--greedy", "--max-new-tokens", "4", "--precision",
                 precision, "--quiet", "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.count("\n") == 3  # an empty prompt too gets its line


def test_cli_perplexity_int8_close_to_fp32(llama, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("".join(" ".join(f"w{(7 * i + j) % 100 + 3}" for j in range(12)) + "\n" for i in range(6)))
    fp32 = tasks.perplexity(str(llama[0]), text.read_text().splitlines())["score"]
    result = run("eval", text, "--metric", "perplexity", "-m", llama[0], "--precision", "int8", "--json")
    assert result.exit_code == 0, result.output
    import json

    int8 = json.loads(result.stdout)["score"]
    assert math.isfinite(int8) and abs(int8 / fp32 - 1) < 0.02, (int8, fp32)


def test_cpu_without_bf16_is_one_line(llama, monkeypatch):
    monkeypatch.setattr(device, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert device.auto_precision(torch.device("cpu")) == "fp32"
    result = run("generate", "w5 w9", "-m", llama[0], "--precision", "bf16", "--device", "cpu", "--quiet")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("llmcli: error: --precision bf16 needs a CPU with avx512_bf16 or amx_bf16;")
    assert result.stderr.count("\n") == 1 and result.stdout == ""


@pytest.mark.parametrize("command", [("generate", "w5"), ("eval", "-", "--metric", "perplexity")])
def test_unknown_precision_is_one_line(command, llama):
    result = CliRunner().invoke(app, [*command, "-m", str(llama[0]), "--precision", "fp8"], input="w5 w6\n")
    assert result.exit_code == 2, result.output
    assert result.stderr == "llmcli: error: unknown precision 'fp8'; use fp32, bf16, int8, int4 or auto\n"


def test_info_shows_flags_and_auto(llama, monkeypatch):
    monkeypatch.setattr(device, "cpu_flags", lambda: {"avx512f", "avx512_bf16", "avx512_vnni", "sse2"})
    result = run("info", "-m", llama[0])
    assert result.exit_code == 0, result.output
    facts = {line[:14].strip(): line[14:].strip() for line in result.stdout.splitlines()}  # "key           value"
    assert facts["cpu flags"] == "avx512f, avx512_bf16, avx512_vnni"
    assert facts["precision auto"] == ("int8" if device.FBGEMM_INT8 else "bf16")
    assert facts["train in"] == "bf16"
    monkeypatch.setattr(device, "cpu_flags", lambda: set())
    shown = run("info", "-m", llama[0], "--json").stdout
    assert shown.count('"precision auto": "fp32"') == 1 and shown.count('"train in": "fp32"') == 1


@pytest.mark.parametrize(
    "flags, picked",
    [
        ({"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile"}, "bf16"),  # AMX tiles
        ({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}, "int8"),  # AMD Zen 4: fbgemm's VNNI int8 fastest
        ({"avx2", "avx_vnni"}, "int8"),
        ({"avx2", "avx512f", "avx512_bf16"}, "bf16"),
        ({"avx2", "avx512f"}, "fp32"),
    ],
)
def test_auto_is_the_fastest_guarded_kind_of_the_cpu(flags, picked, monkeypatch):
    monkeypatch.setattr(device, "cpu_flags", lambda: flags)
    monkeypatch.setattr(device, "FBGEMM_INT8", True)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    assert device.auto_precision(torch.device("cpu")) == picked
    monkeypatch.setattr(device, "FBGEMM_INT8", False)  # no fbgemm: int8 is weight-only, not picked
    assert device.auto_precision(torch.device("cpu")) != "int8"


def test_int8_bias_packed_with_the_weight_follows_changes_to_it():
    """fbgemm adds the bias it was packed with, so a changed bias must make a new pack."""
    torch.manual_seed(0)
    layer = fast.Int8Linear(64, 96)
    x = torch.randn(4, 64)
    with torch.inference_mode():
        before = layer(x)
        assert _relative_error(before, torch.nn.functional.linear(x, layer.weight, layer.bias)) < TOLERANCE["int8"]
    with torch.no_grad():
        layer.bias.add_(1.0)  # in place, as load_state_dict does
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), before + 1.0, atol=1e-5, rtol=1e-5)
    layer.bias = torch.nn.Parameter(layer.bias.detach() + 1.0)  # replaced
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), before + 2.0, atol=1e-5, rtol=1e-5)
    assert "_int8" in layer.__dict__ and layer.__dict__["_int8"][2] is not None  # it ran the int8 kernel


@pytest.mark.skipif(
    not device.FBGEMM_INT8 or "onednn" not in torch.backends.quantized.supported_engines, reason="needs torch's onednn engine"
)
def test_int8_routes_large_products_to_amx_tiles_and_small_to_fbgemm(monkeypatch):
    """A CPU with AMX-INT8 multiplies through oneDNN's int8 (its tiles) from INT8_TILES_MIN_ROWS
    rows and INT8_TILES_MIN_WORK multiply-adds up, through fbgemm below; oneDNN's kernel runs (slower) on any x86 CPU, so
    both are checked here. The pack that must not be used is None: using it would raise."""
    monkeypatch.setattr(fast, "INT8_TILES", True)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=g)
    bias = torch.randn(96, generator=g)
    kind, fbgemm, scale, tiles, kept_bias = fast._int8_pack(weight, bias)
    assert kind == "fbgemm" and tiles is not None and kept_bias is None  # the bias is in both packs
    monkeypatch.setattr(fast, "INT8_TILES_MIN_WORK", 16 * 64 * 96)
    large, small = torch.randn(16, 64, generator=g), torch.randn(15, 64, generator=g)
    for x, made in ((large, (kind, None, scale, tiles, None)), (small, (kind, fbgemm, scale, None, None))):
        got = fast._int8_multiply(x, made, None, None)
        assert _relative_error(got, x @ weight.T + bias) < TOLERANCE["int8"]
    with pytest.raises((RuntimeError, TypeError)):  # small products never take the tiles: a missing pack is noticed
        fast._int8_multiply(small, (kind, None, scale, tiles, None), None, None)


@pytest.mark.skipif(
    not device.FBGEMM_INT8 or "onednn" not in torch.backends.quantized.supported_engines, reason="needs torch's onednn engine"
)
def test_int8_on_amx_tiles_close_to_fp32(llama, monkeypatch):
    """A whole model with both packs, its products on either side of the threshold."""
    monkeypatch.setattr(fast, "INT8_TILES", True)
    monkeypatch.setattr(fast, "INT8_TILES_MIN_WORK", 16 * 64 * 64)
    base = convert_weights(llama[0])
    prompts = torch.cat([PROMPTS, PROMPTS.flip(1)], 1)  # 3 rows x 10 positions: 30 rows a product
    with torch.inference_mode():
        reference = fast.prepare(copy.deepcopy(base)).step(prompts, base.new_cache(3))
        model = fast.prepare(copy.deepcopy(base), "int8")
        logits = model.step(prompts, model.new_cache(3))
        few_rows = _step_logits(model)
    assert _relative_error(logits, reference) < TOLERANCE["int8"]
    assert _relative_error(few_rows, _step_logits(fast.prepare(copy.deepcopy(base)))) < TOLERANCE["int8"]
