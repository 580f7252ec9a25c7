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
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.model import ACTIVATIONS, Attention, FeedForward

# Below this many weights oneDNN's fixed cost per call (about 12 us) outweighs its faster kernel:
# 256 x 256 takes 7 us through MKL and 19 us through oneDNN for one row, 52 and 55 us for 32.
ONEDNN_MIN_WEIGHT = 2**18
ONEDNN_ACTIVATIONS = {"relu": ("relu", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"), "silu": ("swish", "")}
_ACTIVATION_MODULES = {name: make() for name, make in ACTIVATIONS.items()}  # stateless: shared
_onednn_enabled = (os.environ.get("LLMCLI_ONEDNN", "1") != "0" and torch.backends.mkldnn.is_available()
                   and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))  # fmt: skip


def prepare(model: nn.Module) -> nn.Module:
    """Swap in the inference kernels, in place; returns the model. Outputs stay the same up to
    float rounding (bench/decode.py checks decoded tokens against transformers')."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = PackedLinear
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
        if _onednn_enabled and x.dtype == torch.float32 and x.device.type == "cpu" and torch.is_inference_mode_enabled():
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
        global _onednn_enabled
        weight = self.weight
        key = (weight.data_ptr(), None if weight.is_inference() else weight._version)
        made = self.__dict__.get("_packed")
        if made is not None and made[0] is weight and made[1] == key:
            return made[2]
        packed = None
        if (weight.numel() >= ONEDNN_MIN_WEIGHT and weight.dtype == torch.float32 and weight.device.type == "cpu"
                and _memory_allows(weight.nbytes)):  # fmt: skip
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 32)  # 32: rows a decoding step sees
            except (RuntimeError, NotImplementedError):  # a torch build without these kernels: stay on MKL
                _onednn_enabled = False
        self.__dict__["_packed"] = (weight, key, packed)
        return packed

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_packed", None)  # oneDNN's opaque tensors can be neither copied nor pickled
        return state


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
        return attend_one(q, k, v, mask, self.scale).unsqueeze(2)  # (B, H, 1, D)


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None) -> torch.Tensor:
    """Attention for one query per row with two batched matmuls. k and v may hold one row per
    G consecutive query rows (the beams of a sentence, in cross-attention), and Hkv heads for
    R = H / Hkv query heads each (grouped-query attention): both are matched by viewing the
    queries as (B/G, Hkv, G x R, D), never by copying k and v. q (B, H, 1, D) -> (B, H, D)."""
    B, H, _, D = q.shape
    Bk, Hkv, S, _ = k.shape
    G, R = B // Bk, H // Hkv
    q = q.view(Bk, G, Hkv, R, D).transpose(1, 2).reshape(Bk, Hkv, G * R, D)
    q = q * (scale if scale is not None else D**-0.5)  # before the product: q.k may overflow half precision
    scores = torch.matmul(q, k.transpose(-1, -2))  # (Bk, Hkv, G*R, S)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))  # (Bk, 1, 1, S) broadcasts
        else:  # an additive bias, per row and head (T5's relative positions; self-attention, G = 1)
            scores = scores + mask.view(Bk, Hkv if mask.shape[1] == H else 1, -1, S)
    out = torch.matmul(scores.float().softmax(-1).to(v.dtype), v)  # (Bk, Hkv, G*R, D)
    return out.view(Bk, Hkv, G, R, D).transpose(1, 2).reshape(B, H, D)
