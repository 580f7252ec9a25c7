"""Speed for inference, applied to a loaded model: `prepare(model)`.

The model (llmcli.model) is written to be read, with plain `nn.Linear` layers and PyTorch's
SDPA; this module swaps in faster kernels for the same arithmetic, as torchao's
`quantize_(model, config)` swaps layers after loading, so neither a reader of the model nor a
new kernel has to know of the other. Training never calls it.

- `PackedLinear`: in inference mode on the CPU in float32, linear layers multiply through
  oneDNN with the weight packed once into its blocked layout, the feed-forward activation
  fused into the product. Why: `F.linear` goes to MKL's sgemm, which on the few-row products
  of decoding reaches 40-65% of packed oneDNN's speed on the large ones (32 x 768 by 50257:
  41 vs 90 GFLOP/s on one AMD EPYC core); bench/decode.py shows the effect on whole decodes.
  `LLMCLI_ONEDNN=0` turns it off.
- `OneQueryAttention`: a decoding step's attention (one query per row) as two matmuls,
  1.4-2.6x faster than SDPA's CPU kernel at these shapes, reading beam-shared encoder memory
  and grouped key/value heads through views instead of copies.

Both classes are swapped in place of the model's (`module.__class__ = ...`): parameters,
their ties (lm_head = embeddings) and the state dict stay exactly as loaded.

`prepare(model, precision)` also lowers the precision of the linear layers' products
(bench/decode.py measures each beside CTranslate2; one AMD EPYC Zen 4 core, 576 -> 1536, 1 / 32 rows):
- "bf16": parameters in bfloat16 (buffers keep float32; the model casts them where it reads
  them), activations in bfloat16, products through packed oneDNN: 123 / 354 us against fp32's
  193 / 632. Logits leave `step` as float32, so softmax, log-probabilities and scores stay float32.
- "int8" (`Int8Linear`): per-channel symmetric int8 weights, activations quantized per tensor
  per call, through torch's fbgemm `quantized::linear_dynamic` (VNNI): 32 / 292 us. Measured
  slower here: `torch._weight_int8pack_mm` (weight-only, needs bf16 activations: 107 / 952 us),
  torchao 0.18's `Int8DynamicActivationInt8WeightConfig` / `Int8WeightOnlyConfig` (tensor
  subclasses that dequantize: 625-900 / 800-1250 us), `torch._int_mm` (157 / 248 us unpacked).
- "int4" (`Int4Linear`): groupwise asymmetric int4 weights, groups of INT4_GROUP along the input,
  through torch's `_weight_int4pack_mm_for_cpu` with bf16 activations: 64 / 900 us.
The full-precision weights stay in the model (the state dict is unchanged); the packed or
quantized copies live beside them, made on the first inference call.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.device import cpu_flags
from llmcli.model import ACTIVATIONS, Attention, FeedForward

# Below this many weights oneDNN's fixed cost per call (about 12 us) outweighs its faster kernel:
# 256 x 256 takes 7 us through MKL and 19 us through oneDNN for one row, 52 and 55 us for 32.
ONEDNN_MIN_WEIGHT = 2**18
ONEDNN_ACTIVATIONS = {"relu": ("relu", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"), "silu": ("swish", "")}
_ACTIVATION_MODULES = {name: make() for name, make in ACTIVATIONS.items()}  # stateless: shared
_onednn_enabled = (os.environ.get("LLMCLI_ONEDNN", "1") != "0" and torch.backends.mkldnn.is_available()
                   and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))  # fmt: skip


PRECISIONS = ("fp32", "bf16", "int8", "int4")
# 32: divides every d_model and FFN size of the families we convert (576 is not a multiple of 128),
# the most accurate of torch's groups (32, 64, 128, 256), and as fast as 64 at one row.
INT4_GROUP = 32


def prepare(model: nn.Module, precision: str = "fp32") -> nn.Module:
    """Swap in the inference kernels, in place; returns the model. At fp32 outputs stay the same
    up to float rounding (bench/decode.py checks decoded tokens against transformers'); at the
    other precisions (module docstring) logits stay close to fp32's. `precision` is checked against
    the device by llmcli.device.resolve_precision."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    if precision == "bf16":
        for parameter in model.parameters():  # each once, so ties stay ties
            if parameter.is_floating_point():
                parameter.data = parameter.data.to(torch.bfloat16)
    linear_class = {"int8": Int8Linear, "int4": Int4Linear}.get(precision, PackedLinear)
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = linear_class
        elif type(module) is Attention:
            module.__class__ = OneQueryAttention
    for module in model.modules():
        if isinstance(module, FeedForward) and not isinstance(module.activation, nn.Identity):
            activated = module.gate if module.gate is not None else module.up
            activated.fused_activation = next(n for n, m in _ACTIVATION_MODULES.items() if _same_activation(m, module.activation))
            module.activation = nn.Identity()  # now applied inside `activated`
    return model


def _same_activation(a: nn.Module, b: nn.Module) -> bool:
    return type(a) is type(b) and getattr(a, "approximate", None) == getattr(b, "approximate", None)


class PackedLinear(nn.Linear):
    """`nn.Linear` multiplying through oneDNN with a packed weight in inference mode (CPU,
    float32, weights of ONEDNN_MIN_WEIGHT or more, memory allowing); `F.linear` otherwise,
    so training and autograd on a prepared model still work."""

    fused_activation: str | None = None  # a name in ACTIVATIONS, applied to the product

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (_onednn_enabled and x.dtype in _ONEDNN_DTYPES and x.dtype == self.weight.dtype and x.device.type == "cpu"
                and torch.is_inference_mode_enabled()):  # fmt: skip
            packed = self._packed_weight()
            if packed is not None:
                # fused: spares a pass over the (rows x d_ff) result
                attr, algorithm = ONEDNN_ACTIVATIONS[self.fused_activation] if self.fused_activation else ("none", "")
                return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, attr, [], algorithm)
        y = F.linear(x, self.weight, self.bias)
        return _ACTIVATION_MODULES[self.fused_activation](y) if self.fused_activation else y

    def _packed_weight(self) -> torch.Tensor | None:
        """The packed copy of the current weight, or None to use F.linear. Kept in the instance's
        __dict__ (not a buffer: never saved) with the weight, storage and version it was made
        from, so in-place updates and replaced weights are seen. Not seen: changes through
        `.data` (they bypass the version counter, as they do for autograd), and in-place changes
        to a weight made in inference mode, which has no version counter."""
        return self._derived("_packed", self._pack)

    def _pack(self, weight: torch.Tensor) -> torch.Tensor | None:
        global _onednn_enabled
        if weight.numel() < ONEDNN_MIN_WEIGHT or weight.dtype not in _ONEDNN_DTYPES or not _memory_allows(weight.nbytes):
            return None
        try:
            return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 32)  # 32: rows a decoding step sees
        except (RuntimeError, NotImplementedError):  # a torch build without these kernels: stay on MKL
            _onednn_enabled = False
            return None

    def _derived(self, name: str, make) -> torch.Tensor | None:
        """make(weight), kept in __dict__[name] until the weight changes (as _packed_weight says)."""
        weight = self.weight
        key = (weight.data_ptr(), None if weight.is_inference() else weight._version)
        made = self.__dict__.get(name)
        if made is not None and made[0] is weight and made[1] == key:
            return made[2]
        derived = make(weight) if weight.device.type == "cpu" else None
        self.__dict__[name] = (weight, key, derived)
        return derived

    def _activate(self, y: torch.Tensor) -> torch.Tensor:
        return _ACTIVATION_MODULES[self.fused_activation](y) if self.fused_activation else y

    def __getstate__(self) -> dict:
        # oneDNN's and fbgemm's opaque tensors can be neither copied nor pickled
        return {k: v for k, v in self.__dict__.items() if k not in _DERIVED}


_DERIVED = ("_packed", "_int8", "_int4")
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


class Int8Linear(PackedLinear):
    """Per-channel int8 weights in inference mode on the CPU; `PackedLinear` otherwise (training,
    other devices). INT8_KERNEL "fbgemm": activations quantized per tensor at each call, through
    torch's `quantized::linear_dynamic`; "weight-only": `torch._weight_int8pack_mm` on bf16
    activations, 1-3x slower here, the fallback for a torch without fbgemm (torch deprecates its
    quantized tensors, which fbgemm's prepacking takes)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in _ONEDNN_DTYPES and x.device.type == "cpu" and torch.is_inference_mode_enabled():
            made = self._derived("_int8", _int8_pack)
            if made is not None:
                kind, packed, scale = made
                if kind == "fbgemm":
                    # reduce_range: 7-bit activations, so that AVX2's 16-bit pair sums cannot
                    # saturate (fbgemm's advice); VNNI sums in 32 bits and needs no such loss.
                    y = torch.ops.quantized.linear_dynamic(x.float(), packed, _INT8_REDUCE_RANGE).to(x.dtype)
                else:
                    rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
                    y = torch._weight_int8pack_mm(rows, packed, scale).to(x.dtype).view(*x.shape[:-1], -1)
                return self._activate(y if self.bias is None else y + self.bias.to(y.dtype))
        return super().forward(x)


_FBGEMM = "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "linear_dynamic")
INT8_KERNEL = "fbgemm" if _FBGEMM else "weight-only"


def _int8_pack(weight: torch.Tensor) -> tuple[str, object, torch.Tensor]:
    w = weight.detach().float()
    scale = (w.abs().amax(1) / 127).clamp(min=1e-12)  # (N,) per output channel, symmetric
    if INT8_KERNEL == "weight-only":
        return "weight-only", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale.to(torch.bfloat16)
    engine = torch.backends.quantized.engine
    try:
        with warnings.catch_warnings():  # torch deprecates quantized tensors: the fallback above is ready
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch.quantize_per_channel(w, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
        torch.backends.quantized.engine = "fbgemm"
        return "fbgemm", torch.ops.quantized.linear_prepack(qweight, None), scale  # bias: added by forward, it may change
    finally:
        torch.backends.quantized.engine = engine


class Int4Linear(PackedLinear):
    """Groupwise int4 weights (INT4_GROUP inputs a group, asymmetric), through torch's
    `_weight_int4pack_mm_for_cpu`, which multiplies bf16 activations: x is cast in and out.
    Layers the kernel cannot take (inputs not a multiple of the group, outputs not of 16) and
    other devices stay `PackedLinear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and torch.is_inference_mode_enabled():
            made = self._derived("_int4", _int4_pack)
            if made is not None:
                packed, scales_and_zeros = made
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]).to(torch.bfloat16), packed,
                                                               INT4_GROUP, scales_and_zeros)  # fmt: skip
                y = y.to(x.dtype).view(*x.shape[:-1], y.shape[-1])
                return self._activate(y if self.bias is None else y + self.bias.to(y.dtype))
        return super().forward(x)


def _int4_pack(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    N, K = weight.shape
    if K % INT4_GROUP or N % 16:
        return None
    w = weight.detach().float().view(N, K // INT4_GROUP, INT4_GROUP)
    low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-6)
    q = torch.round((w - low) / scale).clamp(0, 15).to(torch.int32).view(N, K)
    zero = low + 8 * scale  # the kernel computes (q - 8) * scale + zero
    scales_and_zeros = torch.stack([scale.view(N, -1).t(), zero.view(N, -1).t()], -1).contiguous()  # (K/G, N, 2)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), scales_and_zeros.to(torch.bfloat16)


_INT8_REDUCE_RANGE = not cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"}


def _memory_allows(nbytes: int) -> bool:
    """Pack a weight only while a quarter of the machine's memory stays available after it: a
    model that barely fits keeps running on MKL instead of running out of memory."""
    try:
        with open("/proc/meminfo") as f:
            info = {
                line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.startswith(("MemTotal:", "MemAvailable:"))
            }
        return info["MemAvailable"] - nbytes > info["MemTotal"] // 4
    except (OSError, KeyError, ValueError, IndexError):  # not Linux: no cheap reading, so pack
        return True


class OneQueryAttention(Attention):
    def attend(self, q, k, v, mask, is_causal):
        if q.shape[2] != 1 or self.training:
            return super().attend(q, k, v, mask, is_causal)
        return attend_one(q, k, v, mask, self.scale, self.softcap).unsqueeze(2)  # (B, H, 1, D)


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None,
               softcap: float | None = None) -> torch.Tensor:  # fmt: skip
    """Attention for one query per row with two batched matmuls. k and v may hold one row per
    G consecutive query rows (the beams of a sentence, in cross-attention), and Hkv heads for
    R = H / Hkv query heads each (grouped-query attention): both are matched by viewing the
    queries as (B/G, Hkv, G x R, D), never by copying k and v. q (B, H, 1, D) -> (B, H, D).
    `softcap`: scores become tanh(scores / cap) * cap before the mask (Gemma 2), as in Attention."""
    B, H, _, D = q.shape
    Bk, Hkv, S, _ = k.shape
    G, R = B // Bk, H // Hkv
    q = q.view(Bk, G, Hkv, R, D).transpose(1, 2).reshape(Bk, Hkv, G * R, D)
    q = q * (scale if scale is not None else D**-0.5)  # before the product: q.k may overflow half precision
    scores = torch.matmul(q, k.transpose(-1, -2))  # (Bk, Hkv, G*R, S)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))  # (Bk, 1, 1, S) broadcasts
        else:  # an additive bias, per row and head (T5's relative positions; self-attention, G = 1)
            scores = scores + mask.view(Bk, Hkv if mask.shape[1] == H else 1, -1, S)
    out = torch.matmul(scores.float().softmax(-1).to(v.dtype), v)  # (Bk, Hkv, G*R, D)
    return out.view(Bk, Hkv, G, R, D).transpose(1, 2).reshape(B, H, D)
