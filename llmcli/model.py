"""The Transformer: attention, blocks, encoder, decoder, key/value cache.

One `Transformer` class covers encoder-decoder, decoder-only and encoder-only models
(the last with a span-prediction head, for extractive QA); every architectural variant
is a `ModelConfig` field, decided when modules are built.

Shapes: B batch, T target/query length, S key length, H heads, D head dim, V vocab.

Decoding talks to the model through `step(tokens, cache) -> logits` only
(see llmcli.decoding). In the first call a row may be left-padded with -1.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.config import ModelConfig

PAD_TOKEN = -1  # marks left padding in tokens passed to `step`


# ---------------------------------------------------------------- building blocks


class Linear(nn.Linear):
    """`nn.Linear` that, in inference mode on the CPU in float32, multiplies through oneDNN with
    its weight packed once into oneDNN's blocked layout.

    Why: `F.linear` goes to MKL's sgemm, which on the few-row products of decoding reaches 40-65%
    of packed oneDNN's speed on the large ones (32 x 768 by 50257: 41 vs 90 GFLOP/s on one AMD
    EPYC core) and about the same on small ones; bench/decode.py shows the effect on whole
    decodes. The packed copy costs one more copy of the weight's memory while the model is used
    for inference, made on first use (if memory allows, see `_memory_allows`) and made again when
    the weight changes. Training, autograd and other devices use `F.linear` as before.
    `LLMCLI_ONEDNN=0` turns the packed path off.
    """

    def forward(self, x: torch.Tensor, activation: str | None = None) -> torch.Tensor:
        """x W^T + b, then `activation` (a name in ACTIVATIONS) if given: fused into the product on
        the oneDNN path, which spares a pass over the (rows x d_ff) result."""
        if _onednn_enabled and x.dtype == torch.float32 and x.device.type == "cpu" and torch.is_inference_mode_enabled():
            packed = self._packed_weight()
            if packed is not None:
                attr, algorithm = ONEDNN_ACTIVATIONS[activation] if activation else ("none", "")
                return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, attr, [], algorithm)
        y = F.linear(x, self.weight, self.bias)
        return ACTIVATIONS[activation](y) if activation else y

    def reset_parameters(self) -> None:
        if not _skip_init():  # see Transformer.for_loading
            super().reset_parameters()

    def _packed_weight(self) -> torch.Tensor | None:
        """The packed copy of the current weight, or None to use F.linear. Kept in the instance's
        __dict__ (not a buffer: never saved) with the weight, storage and version it was made
        from, so in-place updates and replaced weights are seen; changes through `.data` are not
        (they bypass the version counter, as they do for autograd)."""
        global _onednn_enabled
        weight = self.weight
        if weight.is_inference():  # made in inference mode: no version counter to tell us of changes
            return None
        key = (weight.data_ptr(), weight._version)
        made = self.__dict__.get("_packed")
        if made is not None and made[0] is weight and made[1] == key:
            return made[2]
        packed = None
        if (weight.numel() >= ONEDNN_MIN_WEIGHT and weight.dtype == torch.float32 and weight.device.type == "cpu"
                and _memory_allows(weight.nbytes)):
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


# Below this many weights oneDNN's fixed cost per call (about 12 us) outweighs its faster kernel:
# 256 x 256 takes 7 us through MKL and 19 us through oneDNN for one row, 52 and 55 us for 32.
ONEDNN_MIN_WEIGHT = 2**18
_onednn_enabled = (os.environ.get("LLMCLI_ONEDNN", "1") != "0" and torch.backends.mkldnn.is_available()
                   and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))  # fmt: skip


def _memory_allows(nbytes: int) -> bool:
    """Pack a weight only while a quarter of the machine's memory stays available after it: a
    model that barely fits keeps running on MKL instead of running out of memory."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.startswith(("MemTotal:", "MemAvailable:"))}
        return info["MemAvailable"] - nbytes > info["MemTotal"] // 4
    except (OSError, KeyError, ValueError, IndexError):  # not Linux: no cheap reading, so pack
        return True


_building = threading.local()  # .for_loading: True while `Transformer.for_loading` builds, in this thread


@contextlib.contextmanager
def _for_loading():
    _building.for_loading = True
    try:
        yield
    finally:
        _building.for_loading = False


def _skip_init() -> bool:
    return getattr(_building, "for_loading", False)


class Embedding(nn.Embedding):
    """`nn.Embedding` that stays uninitialised while `Transformer.for_loading` builds."""

    def reset_parameters(self) -> None:
        if not _skip_init():  # see Transformer.for_loading
            super().reset_parameters()


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), as in T5 and Llama: no mean, no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in float32 as T5 and Llama do, so half precision does not overflow.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}
ONEDNN_ACTIVATIONS = {"relu": ("relu", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"), "silu": ("swish", "")}


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.gate = Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias) if cfg.glu else None
        self.down = Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.activation = cfg.activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            h = self.gate(x, self.activation) * self.up(x)
        else:
            h = self.up(x, self.activation)
        # No dropout on the d_ff-wide hidden layer (fairseq's activation_dropout defaults to 0, as
        # in Vaswani et al.): the residual dropout after the block regularises, and on CPU the
        # extra mask over B x T x d_ff costs as much as a matmul.
        return self.down(h)


def sinusoidal_table(n_positions: int, dim: int) -> torch.Tensor:
    """Vaswani et al. (2017) positions, laid out [sin | cos] as fairseq, Marian and tensor2tensor do."""
    inv_freq = torch.pow(10000.0, -torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (D/2,)
    angles = torch.arange(n_positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).float()  # (P, dim)


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, 1, T, D) for rotary embeddings (Su et al. 2021), in the
    rotate-half layout that Hugging Face Llama checkpoints use."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, D)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos.to(x.dtype)) + (rotated * sin.to(x.dtype))


def relative_position_bucket(relative: torch.Tensor, bidirectional: bool, n_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's buckets (Raffel et al. 2020): exact for small distances, logarithmic up to max_distance."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        n_buckets //= 2
        buckets = buckets + (relative > 0).long() * n_buckets
        relative = relative.abs()
    else:
        relative = -torch.clamp(relative, max=0)
    max_exact = n_buckets // 2
    is_small = relative < max_exact
    large = max_exact + (
        torch.log(relative.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact) * (n_buckets - max_exact)
    ).long()
    large = torch.clamp(large, max=n_buckets - 1)
    return buckets + torch.where(is_small, relative, large)


class RelativeBias(nn.Module):
    """A learned per-head bias indexed by relative-position bucket, shared by all layers of a stack (T5)."""

    def __init__(self, cfg: ModelConfig, bidirectional: bool):
        super().__init__()
        self.cfg = cfg
        self.bidirectional = bidirectional
        self.embedding = Embedding(cfg.relative_buckets, cfg.n_heads)

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        # q_pos (B, T), k_pos (B, S) -> bias (B, H, T, S)
        relative = k_pos[:, None, :] - q_pos[:, :, None]
        buckets = relative_position_bucket(relative, self.bidirectional, self.cfg.relative_buckets, self.cfg.relative_max_distance)
        return self.embedding(buckets).permute(0, 3, 1, 2)


# ---------------------------------------------------------------- attention


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.bias)
        self.k_proj = Linear(cfg.d_model, self.n_kv_heads * cfg.head_dim, bias=cfg.bias)
        self.v_proj = Linear(cfg.d_model, self.n_kv_heads * cfg.head_dim, bias=cfg.bias)
        self.o_proj = Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.scale = cfg.attention_scale
        self.dropout = cfg.attention_dropout

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)  # (B, n, T, D)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._heads(self.k_proj(x), self.n_kv_heads), self._heads(self.v_proj(x), self.n_kv_heads)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, d)
        mask: torch.Tensor | None,  # bool (B, 1, T, S), True = attend; or float bias (B, H, T, S)
        *,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,  # precomputed (cross-attention)
        past: LayerCache | None = None,  # cached self-attention keys/values, extended here
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        q = self._heads(self.q_proj(x), self.n_heads)  # (B, H, T, D)
        if kv is None:
            k, v = self.project_kv(x)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            if past is not None:
                k, v = past.extend(k, v)  # (B, Hkv, S, D)
        else:
            k, v = kv
        B, _, T, _ = q.shape
        if T == 1 and not self.training:
            return self.o_proj(self._attend_one(q, k, v, mask).reshape(B, 1, -1))
        if k.shape[0] != B:  # keys/values shared by groups of rows (see KVCache), here expanded
            G = B // k.shape[0]
            k, v = k.repeat_interleave(G, dim=0), v.repeat_interleave(G, dim=0)
            mask = mask.repeat_interleave(G, dim=0) if mask is not None else None
        if self.n_kv_heads != self.n_heads:
            repeat = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal and mask is None,
            scale=self.scale,
        )  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def _attend_one(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention for one query per row (a decoding step) with two batched matmuls: on the CPU,
        1.4-2.6x faster than SDPA's kernel at these shapes. k and v may hold one row per G
        consecutive query rows (the beams of a sentence, in cross-attention), and Hkv heads for
        R = H / Hkv query heads each (grouped-query attention): both are matched by viewing the
        queries as (B/G, Hkv, G x R, D), never by copying k and v. Returns (B, H, D)."""
        B, H, _, D = q.shape
        Bk, Hkv, S, _ = k.shape
        G, R = B // Bk, H // Hkv
        q = q.view(Bk, G, Hkv, R, D).transpose(1, 2).reshape(Bk, Hkv, G * R, D)
        q = q * (self.scale if self.scale is not None else D**-0.5)  # before the product: q.k may overflow half precision
        scores = torch.matmul(q, k.transpose(-1, -2))  # (Bk, Hkv, G*R, S)
        if mask is not None:
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, float("-inf"))  # (Bk, 1, 1, S) broadcasts
            else:  # an additive bias, per row and head (T5's relative positions; self-attention, G = 1)
                scores = scores + mask.view(Bk, Hkv if mask.shape[1] == H else 1, -1, S)
        out = torch.matmul(scores.float().softmax(-1).to(v.dtype), v)  # (Bk, Hkv, G*R, D)
        return out.view(Bk, Hkv, G, R, D).transpose(1, 2).reshape(B, H, D)


class Block(nn.Module):
    """Self-attention, optional cross-attention, feed-forward; each with a residual and a norm."""

    def __init__(self, cfg: ModelConfig, cross_attention: bool):
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.self_attn = Attention(cfg)
        self.self_attn_norm = make_norm(cfg)
        self.cross_attn = Attention(cfg) if cross_attention else None
        self.cross_attn_norm = make_norm(cfg) if cross_attention else None
        self.ffn = FeedForward(cfg)
        self.ffn_norm = make_norm(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def _residual(self, x, norm, sublayer):
        if self.pre_norm:
            return x + self.dropout(sublayer(norm(x)))
        return norm(x + self.dropout(sublayer(x)))

    def forward(self, x, self_mask, *, past=None, rope=None, is_causal=False, memory_kv=None, memory_mask=None):
        x = self._residual(x, self.self_attn_norm, lambda h: self.self_attn(h, self_mask, past=past, rope=rope, is_causal=is_causal))
        if self.cross_attn is not None:
            x = self._residual(x, self.cross_attn_norm, lambda h: self.cross_attn(h, memory_mask, kv=memory_kv))
        return self._residual(x, self.ffn_norm, self.ffn)


# ---------------------------------------------------------------- stacks


class Stack(nn.Module):
    """Embeddings, positions, layers and final norm: the encoder, or the decoder."""

    def __init__(self, cfg: ModelConfig, embed_tokens: nn.Embedding, is_decoder: bool):
        super().__init__()
        self.cfg = cfg
        self.is_decoder = is_decoder
        self.embed_tokens = embed_tokens
        self.embed_scale = math.sqrt(cfg.d_model) if cfg.scale_embeddings else 1.0
        if cfg.positions == "learned":
            self.embed_positions = Embedding(cfg.max_positions + cfg.position_offset, cfg.d_model)
        elif cfg.positions == "sinusoidal":
            self.register_buffer("sinusoids", sinusoidal_table(cfg.max_positions, cfg.d_model), persistent=False)
        # BERT's segment embeddings: question 0, context 1
        self.embed_types = Embedding(cfg.type_vocab_size, cfg.d_model) if cfg.type_vocab_size and not is_decoder else None
        self.relative_bias = RelativeBias(cfg, bidirectional=not is_decoder) if cfg.positions == "relative" else None
        self.embedding_norm = make_norm(cfg) if cfg.embedding_norm else None
        cross = is_decoder and cfg.is_encoder_decoder
        n_layers = cfg.n_decoder_layers if is_decoder else cfg.n_encoder_layers
        self.layers = nn.ModuleList(Block(cfg, cross_attention=cross) for _ in range(n_layers))
        self.final_norm = make_norm(cfg) if cfg.final_norm else None
        self.dropout = nn.Dropout(cfg.dropout)

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor, token_types: torch.Tensor | None = None) -> torch.Tensor:
        if self.cfg.positions in ("learned", "sinusoidal"):
            top = int(positions.max()) if positions.numel() else 0
            if top >= self.cfg.max_positions:
                raise ValueError(f"position {top} is past max_positions={self.cfg.max_positions}; inputs must be truncated first")
        x = self.embed_tokens(tokens) * self.embed_scale
        if self.cfg.positions == "learned":
            x = x + self.embed_positions(positions + self.cfg.position_offset)
        elif self.cfg.positions == "sinusoidal":
            x = x + self.sinusoids[positions].to(x.dtype)
        if self.embed_types is not None:
            x = x + self.embed_types(token_types if token_types is not None else torch.zeros_like(tokens))
        if self.embedding_norm is not None:
            x = self.embedding_norm(x)
        return self.dropout(x)

    def rope(self, positions: torch.Tensor):
        if self.cfg.positions != "rope":
            return None
        return rope_angles(positions, self.cfg.head_dim, self.cfg.rope_theta)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        if self.final_norm is not None:
            x = self.final_norm(x)
        return self.dropout(x)


def _with_bias(mask: torch.Tensor | None, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Combine a boolean mask with an additive relative-position bias into one float mask."""
    if bias is None:
        return mask
    bias = bias.to(dtype)
    if mask is None:
        return bias
    return bias.masked_fill(~mask, torch.finfo(dtype).min)


def _select_rows(x: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x.index_select(0, index) for a contiguous x, through a 2-D view: several times faster on
    the CPU than index_select on the 4-D tensor (and this runs every beam-search step)."""
    if out is None:
        return x.reshape(x.shape[0], math.prod(x.shape[1:])).index_select(0, index).view(index.shape[0], *x.shape[1:])
    torch.index_select(x.reshape(x.shape[0], math.prod(x.shape[1:])), 0, index, out=out.view(out.shape[0], math.prod(out.shape[1:])))
    return out


class LayerCache:
    """One layer's self-attention keys and values (B, Hkv, S, D), kept in buffers with room for
    more positions: a step writes its keys in place instead of copying the cache (torch.cat).
    Reordering rows (beam search, every step) copies into the previous step's buffers rather
    than fresh memory, which on the CPU costs page faults as much as the copy itself."""

    ROOM = 16  # positions added each time a buffer is full

    def __init__(self):
        self.k: torch.Tensor | None = None  # (B, Hkv, capacity, D)
        self.v: torch.Tensor | None = None
        self.spare: tuple[torch.Tensor, torch.Tensor] | None = None  # buffers of the same capacity, for select
        self.length = 0

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, Hkv, T, D) keys and values; return all of them so far, as views."""
        B, H, T, D = k.shape
        S = self.length + T
        if self.k is None or S > self.k.shape[2]:
            k_buf, v_buf = k.new_empty(B, H, S + self.ROOM, D), v.new_empty(B, H, S + self.ROOM, D)
            if self.k is not None:
                k_buf[:, :, : self.length], v_buf[:, :, : self.length] = self.k[:, :, : self.length], self.v[:, :, : self.length]
            self.k, self.v, self.spare = k_buf, v_buf, None
        self.k[:, :, self.length : S], self.v[:, :, self.length : S] = k, v
        self.length = S
        return self.k[:, :, :S], self.v[:, :, :S]

    def select(self, index: torch.Tensor) -> None:
        if self.k is None:
            return
        n = index.shape[0]
        if self.spare is not None and self.spare[0].shape[0] >= n:
            k_out, v_out = self.spare[0][:n], self.spare[1][:n]
        else:
            k_out, v_out = self.k.new_empty(n, *self.k.shape[1:]), self.v.new_empty(n, *self.v.shape[1:])
        self.spare = (self.k, self.v)
        self.k, self.v = _select_rows(self.k, index, k_out), _select_rows(self.v, index, v_out)


class KVCache:
    """Per-layer self-attention keys/values, cross-attention keys/values computed once,
    and per-row bookkeeping (which key slots are real, how many real tokens so far).

    Cross-attention keys/values are kept once per source row, with `memory_group` consecutive
    decoder rows reading each (beam search: the beams of a sentence), so reordering beams copies
    nothing there and the beams of a sentence attend to its memory in one matmul.
    """

    def __init__(self, n_layers: int, batch_size: int, device: torch.device):
        self.layers = [LayerCache() for _ in range(n_layers)]
        self.cross_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # (B_src, Hkv, S_src, D) each
        self.memory_mask: torch.Tensor | None = None  # (B_src, 1, 1, S_src) bool
        self.memory_group = 1  # decoder row r reads source row r // memory_group
        self.key_valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)  # (B, S)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,) real tokens so far

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def select(self, index: torch.Tensor) -> None:
        """Keep rows `index` in that order (beam expansion, beam reordering, finished rows leaving)."""
        index = index.to(self.lengths.device)
        for layer in self.layers:
            layer.select(index)
        if self.cross_kv is not None:
            self._select_memory(index // self.memory_group)
        self.key_valid = self.key_valid.index_select(0, index)
        self.lengths = self.lengths.index_select(0, index)

    def _select_memory(self, source_rows: torch.Tensor) -> None:
        """Make decoder row r read source row source_rows[r], copying source rows only when the
        new rows are not runs of equal length over distinct source rows."""
        n = source_rows.shape[0]
        runs, counts = torch.unique_consecutive(source_rows, return_counts=True)
        group = n // max(runs.shape[0], 1)
        if n and bool((counts == group).all()) and runs.unique().shape[0] == runs.shape[0]:
            self.memory_group, source_rows = group, runs
        else:
            self.memory_group = 1
        if not torch.equal(source_rows, torch.arange(self.memory_mask.shape[0], device=source_rows.device)):
            self.cross_kv = [(_select_rows(k, source_rows), _select_rows(v, source_rows)) for k, v in self.cross_kv]
            self.memory_mask = self.memory_mask.index_select(0, source_rows)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.architecture == "encoder-only":
            self.encoder = Stack(cfg, Embedding(cfg.vocab_size, cfg.d_model), is_decoder=False)
            self.decoder = None
            self.span_head = Linear(cfg.d_model, 2)  # start and end logits per token
            if not _skip_init():
                self.apply(self._init_weights)
            return
        tgt_embed = Embedding(cfg.output_vocab_size, cfg.d_model)
        if cfg.is_encoder_decoder:
            src_embed = tgt_embed if cfg.shared_embeddings else Embedding(cfg.vocab_size, cfg.d_model)
            self.encoder = Stack(cfg, src_embed, is_decoder=False)
        else:
            self.encoder = None
        self.decoder = Stack(cfg, tgt_embed, is_decoder=True)
        self.lm_head = Linear(cfg.d_model, cfg.output_vocab_size, bias=False)
        if cfg.tied_output:
            self.lm_head.weight = tgt_embed.weight
        if cfg.final_logits_bias:
            self.register_buffer("final_logits_bias", torch.zeros(1, cfg.output_vocab_size))
        else:
            self.final_logits_bias = None
        if not _skip_init():
            self.apply(self._init_weights)

    @classmethod
    def for_loading(cls, cfg: ModelConfig, device: str | torch.device = "cpu") -> Transformer:
        """A model whose weights are left uninitialised, to be filled by a checkpoint: random
        initialisation costs more than the loading it precedes (1.3 s of 1.7 s for GPT-2 124M).
        (Not the meta device: its first use imports torch's reference ops, over a second.)"""
        with _for_loading():
            model = cls(cfg)
        return model.to(device)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            # With sqrt(d_model) scaling the embeddings start at unit scale after it.
            std = self.cfg.d_model**-0.5 if self.cfg.scale_embeddings else 0.02
            nn.init.normal_(module.weight, std=std)

    @property
    def device(self) -> torch.device:
        return self.encoder.embed_tokens.weight.device if self.decoder is None else self.decoder.embed_tokens.weight.device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.lm_head(hidden * self.cfg.logits_scale if self.cfg.logits_scale != 1.0 else hidden)
        if self.final_logits_bias is not None:
            out = out + self.final_logits_bias.to(out.dtype)
        return out

    # ------------------------------------------------------------ full-sequence passes (training, scoring)

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor, token_types: torch.Tensor | None = None) -> torch.Tensor:
        """src (B, S) token ids, src_mask (B, S) True for real tokens -> memory (B, S, d)."""
        enc = self.encoder
        positions = torch.arange(src.shape[1], device=src.device).expand_as(src)
        x = enc.embed(src, positions, token_types)
        mask = src_mask[:, None, None, :]  # (B, 1, 1, S)
        bias = enc.relative_bias(positions, positions) if enc.relative_bias is not None else None
        mask = _with_bias(mask, bias, x.dtype)
        rope = enc.rope(positions)
        for layer in enc.layers:
            x = layer(x, mask, rope=rope)
        return enc.finish(x)

    def _decode_full(self, tokens: torch.Tensor, memory=None, memory_mask=None) -> torch.Tensor:
        dec = self.decoder
        T = tokens.shape[1]
        positions = torch.arange(T, device=tokens.device).expand_as(tokens)
        x = dec.embed(tokens, positions)
        mask, is_causal = None, True
        if dec.relative_bias is not None:
            causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()[None, None]
            mask, is_causal = _with_bias(causal, dec.relative_bias(positions[:1], positions[:1]), x.dtype), False
        rope = dec.rope(positions[:1])
        cross_mask = memory_mask[:, None, None, :] if memory_mask is not None else None
        for layer in dec.layers:
            memory_kv = layer.cross_attn.project_kv(memory) if memory is not None else None
            x = layer(x, mask, rope=rope, is_causal=is_causal, memory_kv=memory_kv, memory_mask=cross_mask)
        return dec.finish(x)

    def span_logits(self, tokens: torch.Tensor, mask: torch.Tensor, token_types: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder-only: right-padded tokens (B, S), mask (B, S) -> start and end logits (B, S, 2)."""
        return self.span_head(self.encode(tokens, mask, token_types))

    def forward(self, tokens: torch.Tensor, src: torch.Tensor | None = None, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits (B, T, V) for right-padded decoder input `tokens`.

        Right padding needs no mask on the decoder side: causal attention keeps real
        positions from seeing the pads after them, and the loss ignores the pads.
        """
        if self.decoder is None:
            raise ValueError("an encoder-only model has no next-token logits; use span_logits")
        if self.cfg.is_encoder_decoder:
            if src is None or src_mask is None:
                raise ValueError("an encoder-decoder model needs src and src_mask")
            memory = self.encode(src, src_mask)
            return self.logits(self._decode_full(tokens, memory, src_mask))
        return self.logits(self._decode_full(tokens))

    # ------------------------------------------------------------ incremental decoding

    def new_cache(self, batch_size: int, memory: torch.Tensor | None = None, src_mask: torch.Tensor | None = None) -> KVCache:
        cache = KVCache(len(self.decoder.layers), batch_size, self.device)
        if self.cfg.is_encoder_decoder:
            if memory is None or src_mask is None:
                raise ValueError("an encoder-decoder cache needs the encoder memory and its mask")
            # contiguous: every step multiplies by them, and a strided (B, H) would be copied each time
            cache.cross_kv = [tuple(t.contiguous() for t in layer.cross_attn.project_kv(memory)) for layer in self.decoder.layers]
            cache.memory_mask = src_mask[:, None, None, :]
        return cache

    def step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed tokens (B, T) (-1 = left padding), extend the cache, return last-position logits (B, V)."""
        dec = self.decoder
        valid = tokens != PAD_TOKEN  # (B, T)
        tokens = tokens.clamp(min=0)
        B, T = tokens.shape
        positions = (cache.lengths[:, None] + valid.long().cumsum(1) - 1).clamp(min=0)  # (B, T)
        S_prev = cache.key_valid.shape[1]
        cache.key_valid = torch.cat([cache.key_valid, valid], dim=1)  # (B, S)
        cache.lengths = cache.lengths + valid.long().sum(1)
        S = S_prev + T

        x = dec.embed(tokens, positions)
        if T == 1 and dec.relative_bias is None and bool(cache.key_valid.all()):
            mask = None  # the common decoding step: one new token, nothing to hide
        else:
            slots = torch.arange(S, device=tokens.device)
            causal = slots[None, :] <= (S_prev + torch.arange(T, device=tokens.device))[:, None]  # (T, S)
            diagonal = slots[None, :] == (S_prev + torch.arange(T, device=tokens.device))[:, None]
            # A padding query attends to itself only, so no row of the mask is empty (SDPA would give NaN).
            mask = ((causal[None] & cache.key_valid[:, None, :]) | diagonal[None])[:, None]  # (B, 1, T, S)
            if dec.relative_bias is not None:
                key_positions = (cache.key_valid.long().cumsum(1) - 1).clamp(min=0)  # (B, S)
                mask = _with_bias(mask, dec.relative_bias(positions, key_positions), x.dtype)
        rope = dec.rope(positions)
        for i, layer in enumerate(dec.layers):
            memory_kv = cache.cross_kv[i] if cache.cross_kv is not None else None
            x = layer(x, mask, past=cache.layers[i], rope=rope, memory_kv=memory_kv, memory_mask=cache.memory_mask)
        return self.logits(dec.finish(x[:, -1:]))[:, 0].float()
