"""The Transformer: norms, feed-forward, positions, attention, blocks, stacks.

One `Transformer` class covers encoder-decoder, decoder-only and encoder-only models
(the last with a span-prediction head, for extractive QA); every architectural variant
is a `ModelConfig` field, decided when modules are built.

Shapes: B batch, T target/query length, S key length, H heads, D head dim, V vocab.

Decoding talks to the model through `step(tokens, cache) -> logits` only
(see llmcli.decoding); the cache is llmcli.cache's. In the first call a row may be
left-padded with PAD_TOKEN. Speed for inference (packed weights, a one-query attention
path) is applied to a loaded model by llmcli.fast, not written here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.cache import PAD_TOKEN, KVCache, LayerCache
from llmcli.config import ModelConfig

# ---------------------------------------------------------------- building blocks


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), as in T5 and Llama: no mean, no bias.
    Gemma scales by (1 + weight) instead of weight: `offset` 1.0."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in float32 as T5 and Llama do, so half precision does not overflow.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        weight = self.weight + self.offset if self.offset else self.weight
        return weight * x32.to(x.dtype)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    """The config's norm over `dim` features (d_model unless given: Qwen3 norms each head of q and k)."""
    dim = dim or cfg.d_model
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps, cfg.norm_weight_offset)
    return nn.LayerNorm(dim, eps=cfg.norm_eps)


ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
}


class FeedForward(nn.Module):
    """Two linear layers with an activation between; with `glu`, a gated linear unit
    (Shazeer 2020): activation(gate(x)) * up(x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias) if cfg.glu else None
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.activation = ACTIVATIONS[cfg.activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            h = self.activation(self.gate(x)) * self.up(x)
        else:
            h = self.activation(self.up(x))
        # No dropout on the d_ff-wide hidden layer (fairseq's activation_dropout defaults to 0, as
        # in Vaswani et al.): the residual dropout after the block regularises, and on CPU the
        # extra mask over B x T x d_ff costs as much as a matmul.
        return self.down(h)


def sinusoidal_table(n_positions: int, dim: int, style: str = "vaswani") -> torch.Tensor:
    """Vaswani et al. (2017) positions, laid out [sin | cos] as fairseq, Marian and tensor2tensor do;
    fairseq's and tensor2tensor's frequencies (M2M100, NLLB) divide by d/2 - 1 where Marian's divide by d/2."""
    if style == "fairseq":  # in float32, as fairseq and transformers' M2M100 compute it: the same numbers
        inv_freq = torch.exp(torch.arange(dim // 2).float() * -(math.log(10000.0) / (dim // 2 - 1)))
        angles = torch.arange(n_positions).float()[:, None] * inv_freq[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (P, dim)
    else:
        inv_freq = torch.pow(10000.0, -torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (D/2,)
    angles = torch.arange(n_positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).float()  # (P, dim)


def rope_angles(positions: torch.Tensor, cfg: ModelConfig, local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, 1, T, D) for rotary embeddings (Su et al. 2021), in the
    rotate-half layout that Hugging Face Llama checkpoints use, with `cfg.rope_scaling` applied
    as transformers' `modeling_rope_utils` computes it, operation for operation in float32.
    `local`: for the sliding-window layers, which may have a base of their own (Gemma 3)."""
    D, base, factor, kind = cfg.head_dim, cfg.rope_theta, cfg.rope_factor, cfg.rope_scaling
    if local and cfg.rope_local_theta is not None:  # Gemma 3 scales its global layers' rope only
        base, kind = cfg.rope_local_theta, "none"
    exponents = torch.arange(0, D, 2, device=positions.device, dtype=torch.float32) / D  # (D/2,)
    inv_freq = 1.0 / (base**exponents)  # (D/2,), or (B, D/2) for dynamic
    scale = 1.0
    if kind == "linear":
        inv_freq = inv_freq / factor
    elif kind == "dynamic":
        # NTK-aware base, from each row's own length so far: transformers' rows decoded alone
        # (its batched generate takes the batch's longest row and keeps it between calls)
        original = cfg.rope_original_max_positions
        seq_len = positions.amax(-1, keepdim=True) + 1  # (B, 1)
        stretched = base * ((factor * seq_len / original) - (factor - 1)) ** (D / (D - 2))
        inv_freq = torch.where(seq_len > original, 1.0 / (stretched**exponents), inv_freq)
    elif kind == "llama3":
        old = cfg.rope_original_max_positions
        low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        inv_freq = torch.where(~(wavelen < old / high) * ~(wavelen > old / low), smoothed, scaled)
    elif kind == "yarn":  # Peng et al. 2023
        old = cfg.rope_original_max_positions

        def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times in `old` positions
            return (D * math.log(old / (rotations * 2 * math.pi))) / (2 * math.log(base))

        lo, hi = dim_of(cfg.rope_beta_fast), dim_of(cfg.rope_beta_slow)
        if cfg.rope_truncate:
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, D - 1)
        hi = hi + 0.001 if lo == hi else hi
        ramp = torch.clamp((torch.arange(D // 2, dtype=torch.float32, device=positions.device) - lo) / (hi - lo), 0, 1)
        pos_freqs = base**exponents
        extrapolated = 1 - ramp
        inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolated) + (1.0 / pos_freqs) * extrapolated
        scale = cfg.rope_attention_factor
        if scale is None:
            scale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    elif kind == "longrope":
        # short factors while a row is within the pretraining context, long ones past it, chosen from
        # each row's length so far as transformers chooses for a row decoded alone (from the longest
        # row when batched); a row's cached keys are recomputed when it crosses (Transformer.step)
        original = cfg.rope_original_max_positions
        seq_len = positions.amax(-1, keepdim=True) + 1  # (B, 1)
        short, long = (torch.tensor(f, dtype=torch.float32, device=positions.device)
                       for f in (cfg.rope_short_factor, cfg.rope_long_factor))  # fmt: skip
        inv_freq = torch.where(seq_len > original, 1.0 / (long * base**exponents), 1.0 / (short * base**exponents))
        scale = cfg.rope_attention_factor
        if scale is None:
            scale = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0
    freqs = positions.float()[..., None] * inv_freq[..., None, :]  # (B, T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, D)
    if scale != 1.0:
        return emb.cos() * scale, emb.sin() * scale
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
    large = (
        max_exact
        + (
            torch.log(relative.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact) * (n_buckets - max_exact)
        ).long()
    )
    large = torch.clamp(large, max=n_buckets - 1)
    return buckets + torch.where(is_small, relative, large)


class RelativeBias(nn.Module):
    """A learned per-head bias indexed by relative-position bucket, shared by all layers of a stack (T5)."""

    def __init__(self, cfg: ModelConfig, bidirectional: bool):
        super().__init__()
        self.cfg = cfg
        self.bidirectional = bidirectional
        self.embedding = nn.Embedding(cfg.relative_buckets, cfg.n_heads)

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        # q_pos (B, T), k_pos (B, S) -> bias (B, H, T, S)
        relative = k_pos[:, None, :] - q_pos[:, :, None]
        buckets = relative_position_bucket(
            relative, self.bidirectional, self.cfg.relative_buckets, self.cfg.relative_max_distance
        )
        return self.embedding(buckets).permute(0, 3, 1, 2)


# ---------------------------------------------------------------- attention


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        qkv_bias = cfg.bias or cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv_heads * cfg.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv_heads * cfg.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        # Qwen3: each head of q and k normed on its own, before rope
        self.q_norm = make_norm(cfg, cfg.head_dim) if cfg.qk_norm else None
        self.k_norm = make_norm(cfg, cfg.head_dim) if cfg.qk_norm else None
        self.scale = cfg.attention_scale  # None: 1/sqrt(D)
        self.softcap = cfg.attention_softcap
        self.dropout = cfg.attention_dropout

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)  # (B, n, T, D)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Self-attention's three products of x, (B, T, n * D) each: where llmcli.fast makes them one."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def kv_heads(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self._heads(k, self.n_kv_heads)  # (B, Hkv, S, D)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return k, self._heads(v, self.n_kv_heads)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv_heads(self.k_proj(x), self.v_proj(x))

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
        if kv is None:  # self-attention
            q, k, v = self.project_qkv(x)
            k, v = self.kv_heads(k, v)
        else:
            q, (k, v) = self.q_proj(x), kv
        q = self._heads(q, self.n_heads)  # (B, H, T, D)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if kv is None:
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            if past is not None:
                k, v = past.extend(k, v)  # (B, Hkv, S, D)
        B, _, T, _ = q.shape
        out = self.attend(q, k, v, mask, is_causal)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               is_causal: bool) -> torch.Tensor:  # fmt: skip
        """softmax(q k^T * scale + mask) v. k and v may hold one row per G consecutive rows of q
        (the beams of a sentence share its encoder memory, see llmcli.cache.KVCache), and Hkv
        heads for H / Hkv query heads each (grouped-query attention, Ainslie et al. 2023)."""
        B = q.shape[0]
        if k.shape[0] != B:
            G = B // k.shape[0]
            k, v = k.repeat_interleave(G, dim=0), v.repeat_interleave(G, dim=0)
            mask = mask.repeat_interleave(G, dim=0) if mask is not None else None
        if self.n_kv_heads != self.n_heads:
            repeat = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        return self.product(q, k, v, mask, is_causal)

    def product(self, q, k, v, mask, is_causal):
        """softmax(q k^T * scale + mask) v, q, k and v of matching rows and heads: SDPA, or
        written out where SDPA cannot (a soft cap). llmcli.fast's kernels replace this method."""
        if self.softcap is not None:  # SDPA has no soft-capping
            return self.attend_written_out(q, k, v, mask, is_causal)
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal and mask is None,
            scale=self.scale,
        )

    def attend_written_out(self, q, k, v, mask, is_causal):
        """softmax(q k^T * scale + mask) v as transformers' eager path writes it; with a soft cap
        (Gemma 2), softmax(tanh(q k^T * scale / cap) * cap + mask) v: the cap before the mask.
        The scores keep q's precision (bf16 under autocast) up to the float32 softmax, and a row
        with every key masked gives NaN, where SDPA gives zeros: the model's masks have none."""
        scores = torch.matmul(q, k.transpose(-1, -2)) * (self.scale if self.scale is not None else q.shape[-1] ** -0.5)
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap  # (B, H, T, S)
        T, S = scores.shape[-2:]
        if mask is None and is_causal:
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        weights = F.dropout(scores.float().softmax(-1).to(q.dtype), self.dropout if self.training else 0.0, self.training)
        return torch.matmul(weights, v)


class Block(nn.Module):
    """Self-attention, optional cross-attention, feed-forward; each with a residual and a norm
    (two with norm_position "sandwich": before the sublayer and on its output, Gemma 2's)."""

    def __init__(self, cfg: ModelConfig, cross_attention: bool):
        super().__init__()
        self.pre_norm = cfg.norm_position in ("pre", "sandwich")
        sandwich = cfg.norm_position == "sandwich"
        self.self_attn = Attention(cfg)
        self.self_attn_norm = make_norm(cfg)
        self.self_attn_post_norm = make_norm(cfg) if sandwich else None
        self.cross_attn = Attention(cfg) if cross_attention else None
        self.cross_attn_norm = make_norm(cfg) if cross_attention else None
        self.cross_attn_post_norm = make_norm(cfg) if cross_attention and sandwich else None
        self.ffn = FeedForward(cfg)
        self.ffn_norm = make_norm(cfg)
        self.ffn_post_norm = make_norm(cfg) if sandwich else None
        self.dropout = nn.Dropout(cfg.dropout)

    def _residual(self, x, norm, sublayer, post_norm=None):
        if self.pre_norm:
            h = sublayer(norm(x))
            return x + self.dropout(post_norm(h) if post_norm is not None else h)
        return norm(x + self.dropout(sublayer(x)))

    def forward(self, x, self_mask, *, past=None, rope=None, is_causal=False, memory_kv=None, memory_mask=None):
        x = self._residual(
            x, self.self_attn_norm, lambda h: self.self_attn(h, self_mask, past=past, rope=rope, is_causal=is_causal),
            self.self_attn_post_norm,
        )  # fmt: skip
        if self.cross_attn is not None:
            x = self._residual(x, self.cross_attn_norm, lambda h: self.cross_attn(h, memory_mask, kv=memory_kv),
                               self.cross_attn_post_norm)  # fmt: skip
        return self._residual(x, self.ffn_norm, self.ffn, self.ffn_post_norm)


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
            self.embed_positions = nn.Embedding(cfg.max_positions + cfg.position_offset, cfg.d_model)
        elif cfg.positions == "sinusoidal":
            table = sinusoidal_table(cfg.max_positions + cfg.position_offset, cfg.d_model, cfg.sinusoid_style)
            self.register_buffer("sinusoids", table, persistent=False)
        # BERT's segment embeddings: question 0, context 1
        self.embed_types = nn.Embedding(cfg.type_vocab_size, cfg.d_model) if cfg.type_vocab_size and not is_decoder else None
        self.relative_bias = RelativeBias(cfg, bidirectional=not is_decoder) if cfg.positions == "relative" else None
        self.embedding_norm = make_norm(cfg) if cfg.embedding_norm else None
        cross = is_decoder and cfg.is_encoder_decoder
        n_layers = cfg.n_decoder_layers if is_decoder else cfg.n_encoder_layers
        self.layers = nn.ModuleList(Block(cfg, cross_attention=cross) for _ in range(n_layers))
        self.kinds = cfg.decoder_layer_kinds if is_decoder else ("full",) * n_layers  # per layer: "full" or "sliding"
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
            x = x + self.sinusoids[positions + self.cfg.position_offset].to(x.dtype)
        if self.embed_types is not None:
            x = x + self.embed_types(token_types if token_types is not None else torch.zeros_like(tokens))
        if self.embedding_norm is not None:
            x = self.embedding_norm(x)
        return self.dropout(x)

    def rope(self, positions: torch.Tensor, local: bool = False):
        if self.cfg.positions != "rope":
            return None
        return rope_angles(positions, self.cfg, local)

    def views(self, positions: torch.Tensor, mask_of) -> tuple[dict, dict | None]:
        """What the layers attend with: keyword arguments (mask, is_causal, rope) for the full
        attention layers (for all layers, where all are sliding-window layers: Mistral), and `local`,
        those of the sliding-window layers where the stack mixes both kinds (Gemma 2, 3).
        mask_of(window) -> (mask, is_causal) builds the mask for a window (None: no window)."""
        window = self.cfg.sliding_window
        main = "full" if "full" in self.kinds else "sliding"
        mask, is_causal = mask_of(window if main == "sliding" else None)
        rope = self.rope(positions, local=main == "sliding")
        local = None
        if main == "full" and "sliding" in self.kinds:
            local_rope = self.rope(positions, local=True) if self.cfg.rope_local_theta is not None else rope
            local = dict(zip(("mask", "is_causal"), mask_of(window), strict=True), rope=local_rope)
        return dict(mask=mask, is_causal=is_causal, rope=rope), local

    def forward(
        self,
        x: torch.Tensor,  # (B, T, d), embedded
        mask: torch.Tensor | None,
        *,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        is_causal: bool = False,
        past: KVCache | None = None,
        memory_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,  # per layer (cross-attention)
        memory_mask: torch.Tensor | None = None,
        local: dict | None = None,  # mask, is_causal, rope of the "sliding" layers where they differ (see `views`)
    ) -> torch.Tensor:
        full = dict(mask=mask, is_causal=is_causal, rope=rope)
        for i, layer in enumerate(self.layers):
            own = local if local is not None and self.kinds[i] == "sliding" else full
            x = layer(x, own["mask"], past=past.layers[i] if past is not None else None, rope=own["rope"],
                      is_causal=own["is_causal"], memory_kv=memory_kv[i] if memory_kv is not None else None,
                      memory_mask=memory_mask)  # fmt: skip
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


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.architecture == "encoder-only":
            self.encoder = Stack(cfg, nn.Embedding(cfg.vocab_size, cfg.d_model), is_decoder=False)
            self.decoder = None
            self.span_head = nn.Linear(cfg.d_model, 2)  # start and end logits per token
        else:
            tgt_embed = nn.Embedding(cfg.output_vocab_size, cfg.d_model)
            if cfg.is_encoder_decoder:
                src_embed = tgt_embed if cfg.shared_embeddings else nn.Embedding(cfg.vocab_size, cfg.d_model)
                self.encoder = Stack(cfg, src_embed, is_decoder=False)
            else:
                self.encoder = None
            self.decoder = Stack(cfg, tgt_embed, is_decoder=True)
            self.lm_head = nn.Linear(cfg.d_model, cfg.output_vocab_size, bias=False)
            if cfg.tied_output:
                self.lm_head.weight = tgt_embed.weight
            if cfg.final_logits_bias:
                self.register_buffer("final_logits_bias", torch.zeros(1, cfg.output_vocab_size))
            else:
                self.final_logits_bias = None
        self.apply(self._init_weights)

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
        if self.cfg.logits_softcap is not None:  # Gemma 2, 3
            out = torch.tanh(out / self.cfg.logits_softcap) * self.cfg.logits_softcap
        return out

    # ------------------------------------------------------------ full-sequence passes (training, scoring)

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor, token_types: torch.Tensor | None = None) -> torch.Tensor:
        """src (B, S) token ids, src_mask (B, S) True for real tokens -> memory (B, S, d)."""
        enc = self.encoder
        positions = torch.arange(src.shape[1], device=src.device).expand_as(src)
        x = enc.embed(src, positions, token_types)
        mask = src_mask[:, None, None, :]  # (B, 1, 1, S)
        bias = enc.relative_bias(positions, positions) if enc.relative_bias is not None else None
        return enc(x, _with_bias(mask, bias, x.dtype), rope=enc.rope(positions))

    def _decode_full(self, tokens: torch.Tensor, memory=None, memory_mask=None) -> torch.Tensor:
        dec = self.decoder
        T = tokens.shape[1]
        positions = torch.arange(T, device=tokens.device).expand_as(tokens)
        x = dec.embed(tokens, positions)

        def mask_of(window: int | None):
            if dec.relative_bias is None and (window is None or T <= window):
                return None, True
            slots = torch.arange(T, device=tokens.device)
            causal = slots[None, :] <= slots[:, None]  # (T, T)
            if window is not None:  # Mistral: the last `window` positions, the query's own included
                causal &= slots[None, :] > slots[:, None] - window
            mask = causal[None, None]
            if dec.relative_bias is not None:
                mask = _with_bias(mask, dec.relative_bias(positions[:1], positions[:1]), x.dtype)
            return mask, False

        main, local = dec.views(positions[:1], mask_of)
        memory_kv = [layer.cross_attn.project_kv(memory) for layer in dec.layers] if memory is not None else None
        cross_mask = memory_mask[:, None, None, :] if memory_mask is not None else None
        return dec(x, **main, memory_kv=memory_kv, memory_mask=cross_mask, local=local)

    def span_logits(self, tokens: torch.Tensor, mask: torch.Tensor, token_types: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder-only: right-padded tokens (B, S), mask (B, S) -> start and end logits (B, S, 2)."""
        return self.span_head(self.encode(tokens, mask, token_types))

    def forward(
        self, tokens: torch.Tensor, src: torch.Tensor | None = None, src_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
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
        """Feed tokens (B, T) (PAD_TOKEN = left padding), extend the cache, return last-position logits (B, V)."""
        dec = self.decoder
        longrope = self.cfg.rope_scaling == "longrope"
        if longrope:
            cache.history = tokens if cache.history is None else torch.cat([cache.history, tokens], dim=1)
        lengths_before = cache.lengths
        valid = tokens != PAD_TOKEN  # (B, T)
        tokens = tokens.clamp(min=0)
        T = tokens.shape[1]
        positions = (cache.lengths[:, None] + valid.long().cumsum(1) - 1).clamp(min=0)  # (B, T)
        S_prev = cache.key_valid.shape[1]
        cache.key_valid = torch.cat([cache.key_valid, valid], dim=1)  # (B, S)
        cache.lengths = cache.lengths + valid.long().sum(1)
        S = S_prev + T

        x = dec.embed(tokens, positions)
        # the common decoding step (one new token, no relative bias) may need no mask: the one host sync
        all_valid = T == 1 and dec.relative_bias is None and bool(cache.key_valid.all())

        def mask_of(window: int | None):
            # Keys older than the window stay in the cache, masked: each row's window ends at its own position.
            in_window = window is None or S <= window
            if T == 1 and dec.relative_bias is None and in_window and all_valid:
                return None, False  # the common decoding step: one new token, nothing to hide
            slots = torch.arange(S, device=tokens.device)
            causal = slots[None, :] <= (S_prev + torch.arange(T, device=tokens.device))[:, None]  # (T, S)
            diagonal = slots[None, :] == (S_prev + torch.arange(T, device=tokens.device))[:, None]
            visible = causal[None] & cache.key_valid[:, None, :]  # (B, T, S)
            key_positions = (cache.key_valid.long().cumsum(1) - 1).clamp(min=0)  # (B, S)
            if not in_window:
                visible &= key_positions[:, None, :] > positions[:, :, None] - window
            # A padding query attends to itself only, so no row of the mask is empty (SDPA would give NaN).
            mask = (visible | diagonal[None])[:, None]  # (B, 1, T, S)
            if dec.relative_bias is not None:
                mask = _with_bias(mask, dec.relative_bias(positions, key_positions), x.dtype)
            return mask, False

        main, local = dec.views(positions, mask_of)
        x = dec(x, **main, past=cache, memory_kv=cache.cross_kv, memory_mask=cache.memory_mask, local=local)
        logits = self.logits(x[:, -1:])[:, 0].float()
        return self._longrope_switch(cache, lengths_before, logits) if longrope else logits

    def _longrope_switch(self, cache: KVCache, lengths_before: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """A row whose length has just passed rope_original_max_positions runs on the long factors
        at every position, the cached ones included: its keys and values are recomputed from its
        tokens, as transformers' Phi-3 generate drops its cache at that step."""
        original = self.cfg.rope_original_max_positions
        rows = ((lengths_before > 0) & (lengths_before <= original) & (cache.lengths > original)).nonzero()[:, 0]
        if rows.numel() == 0:
            return logits
        fresh = KVCache(len(self.decoder.layers), rows.numel(), self.device)
        recomputed = self.step(cache.history.index_select(0, rows), fresh)  # the same slots, all on long factors
        S = cache.key_valid.shape[1]
        for layer, new in zip(cache.layers, fresh.layers, strict=True):
            layer.k[rows, :, :S], layer.v[rows, :, :S] = new.k[:, :, :S], new.v[:, :, :S]
        return logits.index_copy(0, rows, recomputed)
