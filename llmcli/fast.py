"""Speed beside the model: `prepare(model)` for inference on a loaded model; training's own below.

The model (llmcli.model) is written to be read, with plain `nn.Linear` layers and PyTorch's
SDPA; this module swaps in faster kernels for the same arithmetic, as torchao's
`quantize_(model, config)` swaps layers after loading, so neither a reader of the model nor a
new kernel has to know of the other. Training never calls `prepare`: it has its own speed
tricks at the end of this module, `prepare_training` (attention and dropout) and
`smoothed_cross_entropy` (the loss), each tested against the plain torch it replaces.

- `PackedLinear`: in inference mode on the CPU in float32, linear layers multiply through
  oneDNN with the weight packed once into its blocked layout, the feed-forward activation
  fused into the product. Why: `F.linear` goes to MKL's sgemm, which on the few-row products
  of decoding reaches 40-65% of packed oneDNN's speed on the large ones (32 x 768 by 50257:
  41 vs 90 GFLOP/s on one AMD EPYC core); bench/decode.py shows the effect on whole decodes.
  `LLMCLI_ONEDNN=0` turns it off.
- `OneQueryAttention`: a decoding step's attention (one query per row) as two matmuls,
  1.4-2.6x faster than SDPA's CPU kernel at these shapes, reading beam-shared encoder memory
  and grouped key/value heads through views instead of copies.
- Fused products (`fused_product`): self-attention's q, k, v (`OneQueryAttention.project_qkv`),
  cross-attention's k, v over the memory, and a gated feed-forward's gate and up
  (`FusedFeedForward`) each multiply by their weights stacked, in one call of the layer's kernel
  whose output is split into views. Why: a call has a fixed cost (oneDNN's ~12 us; int8
  quantizes its input at each), which one-row decoding steps feel: the SmolLM-135M shape goes
  from 211 linear calls a step to 121, and decodes about 5% faster at one row (3-9% over
  alternating runs on one shared core; int4 -3 to +7%).

These classes are swapped in place of the model's (`module.__class__ = ...`): parameters,
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
quantized copies live beside them, made on the first inference call: one per layer, or one per
fused group in place of its layers' own.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.device import FBGEMM_INT8, cpu_flags
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
        elif type(module) is FeedForward and module.gate is not None:
            module.__class__ = FusedFeedForward
    for module in model.modules():
        if isinstance(module, FeedForward) and not isinstance(module.activation, nn.Identity):
            activated = module.gate if module.gate is not None else module.up
            activated.fused_activation = next(n for n, m in _ACTIVATION_MODULES.items() if _same_activation(m, module.activation))
            module.activation = nn.Identity()  # now applied inside `activated`
    return model


def _same_activation(a: nn.Module, b: nn.Module) -> bool:
    return type(a) is type(b) and getattr(a, "approximate", None) == getattr(b, "approximate", None)


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    return _ACTIVATION_MODULES[activation](y) if activation else y


class Kernel(NamedTuple):
    """One way to multiply by a linear layer's weight: `make` derives the weight it reads once
    (None: it cannot take this weight), `multiply(x, derived, bias, activation)` runs each call.
    A kernel that packs the bias with the weight (`make(weight, bias)`) is given no bias to multiply."""

    name: str  # the key of the derived weight in its module's __dict__
    accepts: Callable[[torch.Tensor, torch.dtype], bool]  # (x, the weight's dtype)
    make: Callable[..., object | None]  # (weight) or, with packs_bias, (weight, bias or None)
    multiply: Callable[[torch.Tensor, object, torch.Tensor | None, str | None], torch.Tensor]
    packs_bias: bool = False

    def derive(self, weight: torch.Tensor, bias: torch.Tensor | None) -> object | None:
        return self.make(weight, bias) if self.packs_bias else self.make(weight)


def _pack(weight: torch.Tensor) -> torch.Tensor | None:
    global _onednn_enabled
    if weight.numel() < ONEDNN_MIN_WEIGHT or weight.dtype not in _ONEDNN_DTYPES or not _memory_allows(weight.nbytes):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 32)  # 32: rows a decoding step sees
    except (RuntimeError, NotImplementedError):  # a torch build without these kernels: stay on MKL
        _onednn_enabled = False
        return None


def _packed_multiply(x, packed, bias, activation):
    # the activation fused: spares a pass over the (rows x d_ff) result
    attr, algorithm = ONEDNN_ACTIVATIONS[activation] if activation else ("none", "")
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, attr, [], algorithm)


def _int8_multiply(x, made, bias, activation):
    # fbgemm adds the bias packed with the weight in its output stage: no pass of its own over y
    kind, packed, scale, tiles, bias = made
    if kind == "fbgemm":
        if tiles is not None and tiles_are_faster(x.numel() // x.shape[-1], x.shape[-1], scale.numel()):
            packed = tiles
        # reduce_range: 7-bit activations, so that AVX2's 16-bit pair sums cannot
        # saturate (fbgemm's advice); VNNI sums in 32 bits and needs no such loss.
        y = torch.ops.quantized.linear_dynamic(x.float(), packed, _INT8_REDUCE_RANGE).to(x.dtype)
    else:
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch._weight_int8pack_mm(rows, packed, scale).to(x.dtype).view(*x.shape[:-1], -1)
    return _activate(y if bias is None else y + bias.to(y.dtype), activation)


def _int4_multiply(x, made, bias, activation):
    packed, scales_and_zeros = made
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]).to(torch.bfloat16), packed, INT4_GROUP,
                                                   scales_and_zeros)  # fmt: skip
    y = y.to(x.dtype).view(*x.shape[:-1], y.shape[-1])
    return _activate(y if bias is None else y + bias.to(y.dtype), activation)


def _plain_make(weight: torch.Tensor) -> torch.Tensor | None:
    # a fused group's stacked weight, kept as it is only where oneDNN would not take it for being small
    return weight if weight.numel() < ONEDNN_MIN_WEIGHT else None


def _plain_multiply(x, weight, bias, activation):
    return _activate(F.linear(x, weight, bias), activation)


# The int8 and int4 packers sit below, with their layers' classes.
PACKED = Kernel("_packed", lambda x, dtype: _onednn_enabled and x.dtype in _ONEDNN_DTYPES and x.dtype == dtype, _pack,
                _packed_multiply)  # fmt: skip
INT8 = Kernel("_int8", lambda x, dtype: x.dtype in _ONEDNN_DTYPES, lambda w, b: _int8_pack(w, b), _int8_multiply, True)
INT4 = Kernel("_int4", lambda x, dtype: True, lambda w: _int4_pack(w), _int4_multiply)
PLAIN = Kernel("_plain", lambda x, dtype: True, _plain_make, _plain_multiply)


def _derived(store: dict, name: str, tensors: tuple[torch.Tensor, ...], make: Callable[[], object | None]) -> object | None:
    """make(), kept in store[name] with the tensors it was made from (weights, biases), their
    storages and versions, so in-place updates and replaced weights are seen. Not seen: changes
    through `.data` (they bypass the version counter, as they do for autograd), and in-place
    changes to a weight made in inference mode, which has no version counter."""
    key = tuple((t.data_ptr(), None if t.is_inference() else t._version) for t in tensors)
    made = store.get(name)
    if made is not None and made[1] == key and all(a is b for a, b in zip(made[0], tensors, strict=True)):
        return made[2]
    derived = make() if all(t.device.type == "cpu" for t in tensors) else None
    store[name] = (tensors, key, derived)
    return derived


class PackedLinear(nn.Linear):
    """`nn.Linear` multiplying through oneDNN with a packed weight in inference mode (CPU,
    float32 or bfloat16, weights of ONEDNN_MIN_WEIGHT or more, memory allowing); `F.linear`
    otherwise, so training and autograd on a prepared model still work. The derived weights
    live in the instance's __dict__ (not buffers: never saved), made on first use."""

    fused_activation: str | None = None  # a name in ACTIVATIONS, applied to the product
    kernels: tuple[Kernel, ...] = (PACKED,)  # tried in order; F.linear after them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and torch.is_inference_mode_enabled():
            for kernel in self.kernels:
                if kernel.accepts(x, self.weight.dtype):
                    packed_bias = kernel.packs_bias and self.bias is not None
                    tensors = (self.weight, self.bias) if packed_bias else (self.weight,)
                    made = _derived(self.__dict__, kernel.name, tensors, lambda k=kernel: k.derive(self.weight, self.bias))
                    if made is not None:
                        return kernel.multiply(x, made, None if kernel.packs_bias else self.bias, self.fused_activation)
        return _activate(F.linear(x, self.weight, self.bias), self.fused_activation)

    def __getstate__(self) -> dict:
        # oneDNN's and fbgemm's opaque tensors can be neither copied nor pickled
        return {k: v for k, v in self.__dict__.items() if k not in _DERIVED}


_DERIVED = ("_packed", "_int8", "_int4", "_fused")
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


class Int8Linear(PackedLinear):
    """Per-channel int8 weights in inference mode on the CPU; `PackedLinear` otherwise (training,
    other devices). INT8_KERNEL "fbgemm": activations quantized per tensor at each call, through
    torch's `quantized::linear_dynamic`; "weight-only": `torch._weight_int8pack_mm` on bf16
    activations, 1-3x slower here, the fallback for a torch without fbgemm (torch deprecates its
    quantized tensors, which fbgemm's prepacking takes)."""

    kernels = (INT8, PACKED)


INT8_KERNEL = "fbgemm" if FBGEMM_INT8 else "weight-only"


# On a CPU with AMX-INT8, torch's "onednn" quantized engine multiplies on the AMX tiles, which
# fbgemm does not use. oneDNN is faster from INT8_TILES_MIN_ROWS rows and INT8_TILES_MIN_WORK
# multiply-adds (rows x inputs x outputs) up, fbgemm below: its cost per call is lower (one Xeon
# thread, 7 shapes x 7 row counts, bench/README.md "int8 on AMX tiles"; the output layer's 4 or 8
# rows are fbgemm's, although its work is large). So such a CPU keeps both packed weights, where
# memory allows.
INT8_TILES = FBGEMM_INT8 and "onednn" in torch.backends.quantized.supported_engines and "amx_int8" in cpu_flags()
INT8_TILES_MIN_ROWS = 16
INT8_TILES_MIN_WORK = 2**24
_engine_lock = threading.Lock()  # the quantized engine is process-wide state, switched while packing


def tiles_are_faster(rows: int, inputs: int, outputs: int) -> bool:
    """Whether an int8 product of this shape runs faster through oneDNN (AMX tiles) than fbgemm."""
    return rows >= INT8_TILES_MIN_ROWS and rows * inputs * outputs >= INT8_TILES_MIN_WORK


def _int8_pack(
    weight: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[str, object, torch.Tensor, object | None, torch.Tensor | None]:
    """(kind, packed weight, per-channel scale, oneDNN's packed weight or None, the bias where
    the packed weights do not hold it)."""
    w = weight.detach().float()
    bias = None if bias is None else bias.detach().float()
    scale = (w.abs().amax(1) / 127).clamp(min=1e-12)  # (N,) per output channel, symmetric
    if INT8_KERNEL == "weight-only":
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return "weight-only", q, scale.to(torch.bfloat16), None, bias
    with warnings.catch_warnings():  # torch deprecates quantized tensors: the fallback above is ready
        warnings.simplefilter("ignore", UserWarning)
        qweight = torch.quantize_per_channel(w, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
    with _engine_lock:
        engine = torch.backends.quantized.engine
        try:
            torch.backends.quantized.engine = "fbgemm"
            packed = torch.ops.quantized.linear_prepack(qweight, bias)
            tiles = None
            if INT8_TILES and _memory_allows(w.numel()):
                try:
                    torch.backends.quantized.engine = "onednn"
                    tiles = torch.ops.quantized.linear_prepack(qweight, bias)
                except (RuntimeError, NotImplementedError):  # fbgemm's pack alone still serves
                    pass
        finally:
            torch.backends.quantized.engine = engine
    return "fbgemm", packed, scale, tiles, None


class Int4Linear(PackedLinear):
    """Groupwise int4 weights (INT4_GROUP inputs a group, asymmetric), through torch's
    `_weight_int4pack_mm_for_cpu`, which multiplies bf16 activations: x is cast in and out.
    Layers the kernel cannot take (inputs not a multiple of the group, outputs not of 16) and
    other devices stay `PackedLinear`."""

    kernels = (INT4, PACKED)


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


def fused_product(
    owner: nn.Module, name: str, parts: tuple[PackedLinear, ...], x: torch.Tensor
) -> tuple[torch.Tensor, ...] | None:
    """(part(x) for part in parts) as one product over their weights stacked, its output split
    into views; None where the parts must run one by one (training, other devices, no kernel
    takes the stacked weight). One call instead of several: each call has a fixed cost (oneDNN's
    about 12 us) and int8 quantizes x at each. The stacked weight exists only while the kernel's
    copy is made from it, and is kept only by the small-weight F.linear kernel (PLAIN); the parts
    make no copies of their own, so a group costs what its parts' copies would, plus those of
    parts too small to pack alone (fp32: k and v of a GQA model)."""
    kind = type(parts[0])
    if x.device.type != "cpu" or not torch.is_inference_mode_enabled() or any(type(p) is not kind for p in parts):
        return None
    weights = tuple(p.weight for p in parts)
    biases = tuple(p.bias for p in parts)
    tensors = weights + tuple(b for b in biases if b is not None)
    store = owner.__dict__.setdefault("_fused", {})
    for kernel in (*kind.kernels, PLAIN):
        if not kernel.accepts(x, weights[0].dtype):
            continue

        def make(kernel=kernel):
            if any(w.dtype != weights[0].dtype for w in weights) or not _memory_allows(sum(w.nbytes for w in weights)):
                return None
            bias = None
            if any(b is not None for b in biases):
                bias = torch.cat([b.detach() if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(weights, biases)])
            derived = kernel.derive(torch.cat([w.detach() for w in weights]), bias)
            if derived is None:
                return None
            return derived, None if kernel.packs_bias else bias

        made = _derived(store, name + kernel.name, tensors, make)
        if made is not None:
            y = kernel.multiply(x, made[0], made[1], None)
            return y.split([w.shape[0] for w in weights], dim=-1)
    return None


def fallbacks(model: nn.Module) -> list[str]:
    """The linear layers whose products have not run through their class's first kernel (int8's,
    int4's, packed oneDNN's) in inference: layers it could not take, layers not run yet. Tests
    read it to see that a precision really ran everywhere."""
    covered = set()  # (weight id, kernel name) of the parts of fused groups
    for module in model.modules():
        for name, (tensors, _, made) in module.__dict__.get("_fused", {}).items():
            if made is not None:
                covered |= {(id(t), k.name) for k in (PACKED, INT8, INT4, PLAIN) if name.endswith(k.name) for t in tensors}
    missed = []
    for name, module in model.named_modules():
        if isinstance(module, PackedLinear):
            first = module.kernels[0].name
            if module.__dict__.get(first, (None,) * 3)[2] is None and (id(module.weight), first) not in covered:
                missed.append(name)
    return missed


class FusedFeedForward(FeedForward):
    """A gated feed-forward whose gate and up products run as one (`fused_product`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = fused_product(self, "gate_up", (self.gate, self.up), x)
        if fused is None:
            return super().forward(x)
        gate, up = fused
        return self.down(_activate(gate, self.gate.fused_activation) * up)  # prepare moved the activation into `gate`

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in _DERIVED}


class OneQueryAttention(Attention):
    """Attention whose self-attention q, k, v products run as one, as do cross-attention's k, v
    over the encoder memory (`fused_product`), and whose one-query steps go through `attend_one`."""

    def project_qkv(self, x):
        return fused_product(self, "qkv", (self.q_proj, self.k_proj, self.v_proj), x) or super().project_qkv(x)

    def project_kv(self, x):
        fused = fused_product(self, "kv", (self.k_proj, self.v_proj), x)
        return self.kv_heads(*fused) if fused is not None else super().project_kv(x)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in _DERIVED}

    def attend(self, q, k, v, mask, is_causal):
        if q.shape[2] != 1 or self.training:
            return super().attend(q, k, v, mask, is_causal)
        return attend_one(q, k, v, mask, self.scale, self.softcap).unsqueeze(2)  # (B, H, 1, D)


# The longest queries or keys whose attention TrainingAttention writes out while training: Multi30k's
# sentences (26 tokens) were measured; (B, H, 128, 128) bf16 scores are still small beside the layers' activations.
WRITTEN_OUT_MAX_TOKENS = 128


class TrainingAttention(Attention):
    """Attention for training on a CPU under bf16 autocast. Why: torch's CPU SDPA kernel is slow
    at training shapes, and slower still in bfloat16. Forward and backward of 80 x 4 heads x 26
    tokens x 64 with a padding mask, two threads: SDPA 15.3 ms in bf16 against 3.6 in float32 on
    an Intel Xeon (AMX), 13.3 against 6.3 on an AMD EPYC (Zen 4); written out
    (`Attention.attend_written_out`, bf16 matmuls around a float32 softmax) 2.6 ms on the AMD
    EPYC. SDPA was a quarter of a bf16 step. So short sequences (translation's sentences) write
    the product out; longer ones, where the written-out scores grow as T^2 and the speed is not
    measured, keep SDPA in float32. The linear layers around it keep autocast's bfloat16."""

    def product(self, q, k, v, mask, is_causal):
        # with grad only: the backward is what is slow, so validation keeps bf16 SDPA
        if not (
            q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_autocast_enabled("cpu") and torch.is_grad_enabled()
        ):
            return super().product(q, k, v, mask, is_causal)
        if max(q.shape[-2], k.shape[-2]) <= WRITTEN_OUT_MAX_TOKENS:
            return self.attend_written_out(q, k, v, mask, is_causal)
        with torch.autocast("cpu", enabled=False):
            return super().product(q.float(), k.float(), v.float(), mask, is_causal)


class TrainingDropout(nn.Dropout):
    """nn.Dropout whose mask, on a CPU, compares 16 random bits per element with the drop
    probability, the bits drawn 64 at a time from torch's generator (so seeds and resumes hold).
    Why: torch's CPU `bernoulli_` costs about 5.5 ns an element (3.0 ms for 80 x 26 x 256, two
    Xeon threads), and dropout was 10% of a bf16 training step; this mask costs about a third.
    The probability is rounded to a multiple of 1/65536 (0.1 drops 0.100006 of the elements),
    and the kept elements scaled for the rounded one; a p that rounds to 0 or 1 is nn.Dropout's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropped = round(self.p * 65536)  # of 65536
        if not self.training or x.device.type != "cpu" or not 0 < dropped < 65536:
            return super().forward(x)
        n = x.numel()
        # the whole int64 range: random_() without bounds leaves the top bit 0
        words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1)
        bits = words.view(torch.int16)[:n].view(x.shape)
        keep = (bits >= dropped - 32768).to(x.dtype).mul_(65536 / (65536 - dropped))
        return x.mul_(keep) if self.inplace else x * keep


def prepare_training(model: nn.Module) -> nn.Module:
    """Swap in training's speed tricks (`TrainingAttention`, `TrainingDropout`), in place; returns
    the model. The parameters and the state dict stay as they are."""
    for module in model.modules():
        if type(module) is Attention:
            module.__class__ = TrainingAttention
        elif type(module) is nn.Dropout:
            module.__class__ = TrainingDropout
    return model


class _SmoothedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, smoothing, ignore_index):
        valid = labels != ignore_index
        target = labels.masked_fill(~valid, 0)[:, None]
        x = logits.float()
        # -sum_j q_j log p_j with q = (1 - s) one-hot + s / V: F.cross_entropy's label smoothing
        loss = torch.logsumexp(x, -1) - (1 - smoothing) * x.gather(1, target).squeeze(1) - smoothing * x.mean(-1)
        ctx.save_for_backward(logits, target, valid)
        ctx.smoothing = smoothing
        return torch.where(valid, loss, 0.0).sum()  # not loss * valid: an ignored row may hold inf

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        logits, target, valid = ctx.saved_tensors
        s, V = ctx.smoothing, logits.shape[-1]
        w = (grad * valid)[:, None].float()
        g = torch.softmax(logits, -1, dtype=torch.float32)
        torch.addcmul(w * (-s / V), g, w, out=g)  # (p - s / V) * w, in place
        ignored = (~valid).nonzero().squeeze(1)  # few rows (padding): zeroed, not multiplied, as they may be NaN
        if ignored.numel():
            g.index_fill_(0, ignored, 0.0)
        g.scatter_add_(1, target, w * -(1 - s))
        return g.to(logits.dtype), None, None, None


def smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, smoothing: float, ignore_index: int) -> torch.Tensor:
    """F.cross_entropy(logits.float(), labels, label_smoothing=smoothing, ignore_index=ignore_index,
    reduction="sum") for (N, V) logits, computed in float32 (float64 logits too), with a backward
    of one softmax and two passes in place. Why: torch's backward makes the smoothed and the one-hot
    gradients over (N, V) apart and adds them (log_softmax backward, fill, add, copy), 16%
    of a bf16 training step at Multi30k's shape (2,000 x 4,000); this costs a third of that."""
    return _SmoothedCrossEntropy.apply(logits, labels, smoothing, ignore_index)


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
