"""One frozen dataclass that describes every architecture llmcli runs.

Variants are fields with closed sets of values, never subclasses: the same fields
describe a model trained here and Marian, BART, T5, GPT-2, Llama or BERT checkpoints.
config.json stores these fields and nothing else; unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llmcli.errors import UserError

Architecture = Literal["encoder-decoder", "decoder-only", "encoder-only"]
Head = Literal["lm", "span"]  # next-token logits; or start/end logits per token (extractive QA, BERT)
Activation = Literal["relu", "gelu", "gelu_tanh", "silu"]
Norm = Literal["layernorm", "rmsnorm"]
NormPosition = Literal["pre", "post", "sandwich"]  # sandwich: pre-norm, and a norm on each sublayer's output (Gemma 2, 3)
LayerKind = Literal["full", "sliding"]  # a decoder layer's self-attention: every earlier position, or the last sliding_window
Positions = Literal["sinusoidal", "learned", "rope", "relative"]
SinusoidStyle = Literal["vaswani", "fairseq"]
RopeScaling = Literal["none", "linear", "dynamic", "llama3", "yarn", "longrope"]
# the rope_* parameters each scaling reads (transformers' modeling_rope_utils); any other left at its default
ROPE_SCALING_PARAMETERS: dict[str, tuple[str, ...]] = {
    "none": (),
    "linear": ("rope_factor",),
    "dynamic": ("rope_factor", "rope_original_max_positions"),
    "llama3": ("rope_factor", "rope_original_max_positions", "rope_low_freq_factor", "rope_high_freq_factor"),
    "yarn": ("rope_factor", "rope_original_max_positions", "rope_beta_fast", "rope_beta_slow", "rope_attention_factor",
             "rope_truncate"),
    "longrope": ("rope_factor", "rope_original_max_positions", "rope_attention_factor", "rope_short_factor",
                 "rope_long_factor"),
}  # fmt: skip


@dataclass(frozen=True)
class ModelConfig:
    architecture: Architecture = "encoder-decoder"
    vocab_size: int = 8000  # source vocabulary (or the only one)
    tgt_vocab_size: int | None = None  # None: same vocabulary as the source
    d_model: int = 512
    n_heads: int = 8
    d_head: int | None = None  # per-head size; None: d_model // n_heads (T5's d_kv may differ)
    n_kv_heads: int | None = None  # grouped-query attention (Llama); None: n_heads
    n_encoder_layers: int = 6  # 0 for decoder-only
    n_decoder_layers: int = 6  # 0 for encoder-only
    d_ff: int = 2048
    activation: Activation = "relu"
    glu: bool = False  # gated FFN: act(x W_gate) * (x W_up); silu + glu is SwiGLU, gelu_tanh + glu is T5 v1.1
    norm: Norm = "layernorm"
    norm_position: NormPosition = "pre"
    norm_eps: float = 1e-5
    embedding_norm: bool = False  # a norm right after the embeddings (BART, mBART)
    final_norm: bool = True  # a norm after the last layer of each stack (pre-norm models)
    positions: Positions = "sinusoidal"
    max_positions: int = 512
    position_offset: int = 0  # BART's learned positions start at index 2; M2M100's sinusoids at pad_id + 1
    # sinusoid frequencies: "vaswani" 10000**(-2i/d) (Marian); "fairseq" exp(-i ln(10000) / (d/2 - 1))
    # (tensor2tensor, fairseq, M2M100, NLLB); both laid out [sin | cos]
    sinusoid_style: SinusoidStyle = "vaswani"
    type_vocab_size: int = 0  # token type (segment) embeddings added to the encoder's (BERT: 2); 0: none
    rope_theta: float = 10000.0
    # Rope scaling for contexts past pretraining (Llama 3.x: llama3; Qwen2.5 long context: yarn):
    # "linear" divides every frequency by rope_factor; "dynamic" (NTK) raises the base once a row
    # runs past rope_original_max_positions, from that row's length so far; "llama3" divides the low
    # frequencies, keeps the high ones, blends between; "yarn" blends by rotations per dimension
    # (beta_fast, beta_slow) and scales cos/sin by rope_attention_factor (None: 0.1 ln(factor) + 1).
    rope_scaling: RopeScaling = "none"
    rope_factor: float = 1.0
    rope_original_max_positions: int | None = None  # the pretraining context the scaling stretches
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_beta_fast: float = 32.0  # yarn
    rope_beta_slow: float = 1.0  # yarn
    rope_attention_factor: float | None = None  # yarn
    rope_truncate: bool = True  # yarn: the blended range rounded out to whole dimensions
    # longrope (Phi-3 128k; Ding et al. 2024): frequencies divided per dimension by rope_short_factor
    # while a row's length is at most rope_original_max_positions, by rope_long_factor past it; cos/sin
    # scaled by rope_attention_factor (None: sqrt(1 + ln(rope_factor) / ln(original)), 1 if factor <= 1)
    rope_short_factor: tuple[float, ...] | None = None
    rope_long_factor: tuple[float, ...] | None = None
    rope_local_theta: float | None = None  # the rope base of the "sliding" layers, unscaled (Gemma 3); None: as the others
    relative_buckets: int = 32  # T5 relative-position buckets
    relative_max_distance: int = 128
    attention_scale: float | None = None  # None: 1/sqrt(head_dim); T5 folds it into its weights (1.0)
    dropout: float = 0.1
    attention_dropout: float = 0.0
    scale_embeddings: bool = False  # multiply embeddings by sqrt(d_model) (Vaswani et al., Marian)
    shared_embeddings: bool = True  # encoder and decoder share one embedding matrix
    tied_output: bool = True  # output projection is the decoder embedding matrix
    logits_scale: float = 1.0  # T5 v1 scales the tied output by d_model**-0.5
    final_logits_bias: bool = False  # a learned/loaded bias on the logits (BART, Marian)
    head: Head = "lm"  # "span" only on an encoder-only model
    bias: bool = True  # biases in attention and FFN projections (GPT-2, BART yes; Llama, T5 no)
    qkv_bias: bool = False  # q, k and v projection biases even where bias=False, none on o (Qwen2)
    qk_norm: bool = False  # a norm over each head of q and k, before rope (Qwen3)
    norm_weight_offset: float = 0.0  # rmsnorm scales by (offset + weight): Gemma stores weight - 1 (offset 1.0)
    sliding_window: int | None = None  # decoder self-attention sees this many positions, itself included (Mistral)
    # per decoder layer, "full" or "sliding" (Gemma 2, 3: local and global layers); None: every layer
    # "sliding" if sliding_window is set, else "full"
    layer_kinds: tuple[LayerKind, ...] | None = None
    attention_softcap: float | None = None  # attention logits become tanh(x / cap) * cap, before the mask (Gemma 2)
    logits_softcap: float | None = None  # the same on the output logits (Gemma 2, 3)
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    decoder_start_id: int | None = None  # first decoder token; None: bos_id

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):  # JSON gives lists where the fields hold tuples
            if isinstance(getattr(self, field.name), list) and typing.get_origin(_field_types()[field.name]) is not Literal:
                object.__setattr__(self, field.name, tuple(getattr(self, field.name)))
        for field in dataclasses.fields(self):
            _check_type(field.name, getattr(self, field.name), _field_types()[field.name])
        positive = ["vocab_size", "d_model", "n_heads", "d_ff", "max_positions"]
        if self.architecture != "encoder-only":
            positive.append("n_decoder_layers")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"config: {name}={getattr(self, name)} must be positive")
        if self.d_head is None and self.d_model % self.n_heads:
            raise UserError(f"config: n_heads={self.n_heads} does not divide d_model={self.d_model}")
        if self.d_head is not None and self.d_head <= 0:
            raise UserError(f"config: d_head={self.d_head} must be positive")
        if self.type_vocab_size < 0:
            raise UserError(f"config: type_vocab_size={self.type_vocab_size} must be 0 or more")
        if self.n_kv_heads is not None and (self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads):
            raise UserError(f"config: n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.architecture == "decoder-only":
            if self.n_encoder_layers != 0:
                raise UserError(f"config: a decoder-only model has n_encoder_layers=0, not {self.n_encoder_layers}")
            if self.tgt_vocab_size not in (None, self.vocab_size):
                raise UserError("config: a decoder-only model has one vocabulary; leave tgt_vocab_size unset")
        elif self.architecture == "encoder-only":
            if self.n_encoder_layers <= 0 or self.n_decoder_layers != 0:
                raise UserError(
                    f"config: an encoder-only model has n_encoder_layers > 0 and n_decoder_layers=0, "
                    f"not {self.n_encoder_layers} and {self.n_decoder_layers}"
                )
            if self.tgt_vocab_size not in (None, self.vocab_size):
                raise UserError("config: an encoder-only model has one vocabulary; leave tgt_vocab_size unset")
        elif self.n_encoder_layers <= 0:
            raise UserError(f"config: n_encoder_layers={self.n_encoder_layers} must be positive for an encoder-decoder")
        if (self.head == "span") != (self.architecture == "encoder-only"):
            raise UserError(f"config: head={self.head!r} does not fit a {self.architecture} model (span heads are encoder-only)")
        if (
            self.shared_embeddings
            and self.architecture == "encoder-decoder"
            and self.tgt_vocab_size
            not in (
                None,
                self.vocab_size,
            )
        ):
            raise UserError(
                f"config: shared_embeddings needs one vocabulary, but vocab_size={self.vocab_size} "
                f"and tgt_vocab_size={self.tgt_vocab_size}"
            )
        if self.positions == "rope" and self.head_dim % 2:
            raise UserError(f"config: rope needs an even head_dim, not {self.head_dim}")
        self._check_rope_scaling()
        if self.positions == "sinusoidal" and self.d_model % 2:
            raise UserError(f"config: sinusoidal positions need an even d_model, not {self.d_model}")
        if self.positions == "sinusoidal" and self.sinusoid_style == "fairseq" and self.d_model < 4:
            raise UserError(f"config: fairseq sinusoids need d_model >= 4, not {self.d_model}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise UserError(f"config: sliding_window={self.sliding_window} must be positive")
        self._check_layers()
        if self.norm_weight_offset and self.norm != "rmsnorm":
            raise UserError(f"config: norm_weight_offset={self.norm_weight_offset} needs norm='rmsnorm', not {self.norm!r}")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.attention_dropout < 1.0:
            raise UserError(f"config: dropout={self.dropout}, attention_dropout={self.attention_dropout} must be in [0, 1)")
        for name in ("pad_id", "bos_id", "eos_id"):
            if not 0 <= getattr(self, name) < self.output_vocab_size:
                raise UserError(f"config: {name}={getattr(self, name)} is outside the vocabulary of {self.output_vocab_size}")

    def _check_layers(self) -> None:
        if self.layer_kinds is not None:
            if len(self.layer_kinds) != self.n_decoder_layers:
                raise UserError(
                    f"config: layer_kinds has {len(self.layer_kinds)} entries for n_decoder_layers={self.n_decoder_layers}"
                )
            if "sliding" in self.layer_kinds and self.sliding_window is None:
                raise UserError("config: layer_kinds has 'sliding' layers but sliding_window is not set")
        for name in ("attention_softcap", "logits_softcap"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"config: {name}={getattr(self, name)} must be positive")

    def _check_rope_scaling(self) -> None:
        kind, defaults = self.rope_scaling, {f.name: f.default for f in dataclasses.fields(self)}
        stray = [n for n in defaults if n.startswith("rope_") and n not in ("rope_theta", "rope_scaling", "rope_local_theta")
                 and n not in ROPE_SCALING_PARAMETERS[kind] and getattr(self, n) != defaults[n]]  # fmt: skip
        if stray:
            raise UserError(f"config: {', '.join(f'{n}={getattr(self, n)!r}' for n in stray)} unused with rope_scaling={kind!r}")
        if self.rope_local_theta is not None:
            if self.positions != "rope" or self.rope_local_theta <= 0:
                raise UserError(f"config: rope_local_theta={self.rope_local_theta} needs positions='rope' and a positive value")
        if kind == "none":
            return
        if self.positions != "rope":
            raise UserError(f"config: rope_scaling={kind!r} needs positions='rope', not {self.positions!r}")
        if self.rope_factor <= 0:
            raise UserError(f"config: rope_factor={self.rope_factor} must be positive")
        if kind != "linear" and (self.rope_original_max_positions or 0) <= 0:
            raise UserError(f"config: rope_scaling={kind!r} needs a positive rope_original_max_positions, "
                            f"not {self.rope_original_max_positions}")  # fmt: skip
        if kind == "dynamic" and self.head_dim <= 2:
            raise UserError(f"config: dynamic rope scaling needs head_dim > 2, not {self.head_dim}")
        if kind == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise UserError(f"config: rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
                            f"rope_low_freq_factor={self.rope_low_freq_factor}")  # fmt: skip
        if kind == "yarn" and self.rope_attention_factor is not None and self.rope_attention_factor <= 0:
            raise UserError(f"config: rope_attention_factor={self.rope_attention_factor} must be positive")
        if kind == "longrope":
            if self.architecture != "decoder-only":  # its switch recomputes a decoder-only cache (Transformer.step)
                raise UserError(f"config: rope_scaling='longrope' needs a decoder-only model, not {self.architecture}")
            if self.rope_attention_factor is not None and self.rope_attention_factor <= 0:
                raise UserError(f"config: rope_attention_factor={self.rope_attention_factor} must be positive")
            for name in ("rope_short_factor", "rope_long_factor"):
                factors = getattr(self, name)
                if factors is None or len(factors) != self.head_dim // 2 or min(factors) <= 0:
                    raise UserError(f"config: longrope needs {name} as {self.head_dim // 2} positive numbers "
                                    f"(head_dim / 2), not {factors!r}")  # fmt: skip

    @property
    def decoder_layer_kinds(self) -> tuple[str, ...]:
        """Each decoder layer's kind of self-attention, "full" or "sliding"."""
        if self.layer_kinds is not None:
            return self.layer_kinds
        return ("full" if self.sliding_window is None else "sliding",) * self.n_decoder_layers

    @property
    def head_dim(self) -> int:
        return self.d_head or self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def output_vocab_size(self) -> int:
        return self.tgt_vocab_size or self.vocab_size

    @property
    def n_parameters(self) -> int:
        """The parameter count of the model this config builds (tied matrices once), reckoned
        without building it: a config can be refused before its weights are allocated."""
        d, ff, q, kv = self.d_model, self.d_ff, self.n_heads * self.head_dim, self.kv_heads * self.head_dim
        bias, qkv_bias = int(self.bias), int(self.bias or self.qkv_bias)
        per_dim = 2 if self.norm == "layernorm" else 1
        norm = d * per_dim * (2 if self.norm_position == "sandwich" else 1)  # per sublayer
        attention = d * q + q * qkv_bias + 2 * (d * kv + kv * qkv_bias) + q * d + d * bias
        attention += 2 * self.head_dim * per_dim if self.qk_norm else 0
        ffn = (2 + self.glu) * d * ff + (1 + self.glu) * ff * bias + d * bias

        def stack(n_layers: int, is_decoder: bool) -> int:
            cross = is_decoder and self.is_encoder_decoder
            n = n_layers * (attention * (1 + cross) + ffn + norm * (2 + cross))
            n += d * per_dim * (self.embedding_norm + self.final_norm)
            n += (self.max_positions + self.position_offset) * d if self.positions == "learned" else 0
            n += self.relative_buckets * self.n_heads if self.positions == "relative" else 0
            n += self.type_vocab_size * d if self.type_vocab_size and not is_decoder else 0
            return n

        if self.architecture == "encoder-only":
            return self.vocab_size * d + stack(self.n_encoder_layers, False) + 2 * d + 2  # span head
        n = self.output_vocab_size * d + stack(self.n_decoder_layers, True)
        if self.is_encoder_decoder:
            n += stack(self.n_encoder_layers, False) + (0 if self.shared_embeddings else self.vocab_size * d)
        return n + (0 if self.tied_output else d * self.output_vocab_size)

    @property
    def is_encoder_decoder(self) -> bool:
        return self.architecture == "encoder-decoder"

    @property
    def start_id(self) -> int:
        return self.bos_id if self.decoder_start_id is None else self.decoder_start_id

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> ModelConfig:
        if not isinstance(data, dict):
            raise UserError(f"{source}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"{source}: unknown field(s) {', '.join(unknown)}")
        try:
            return cls(**data)
        except UserError as e:
            raise UserError(f"{source}: {str(e).removeprefix('config: ')}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "config.json") -> ModelConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{source}: not valid JSON ({e.msg} at line {e.lineno})") from None
        return cls.from_dict(data, source)

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: cannot read ({e})") from None
        return cls.from_json(text, str(path))


def _field_types() -> dict[str, object]:
    return typing.get_type_hints(ModelConfig)


def _check_type(name: str, value: object, hint: object) -> None:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise UserError(f"config: {name}={value!r} is not one of {', '.join(map(repr, args))}")
        return
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return
        hint = next(a for a in args if a is not type(None))
        return _check_type(name, value, hint)
    if origin is tuple:  # tuple[X, ...]
        if not isinstance(value, tuple):
            raise UserError(f"config: {name}={value!r} should be a list")
        for item in value:
            _check_type(name, item, args[0])
        return
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        bool: isinstance(value, bool),
        str: isinstance(value, str),
    }.get(hint, True)
    if not ok:
        raise UserError(f"config: {name}={value!r} should be of type {getattr(hint, '__name__', hint)}")


# Presets for training from scratch. "base" is the Transformer-base of Vaswani et al. (2017),
# pre-norm as most current training recipes use, since it trains stably without long warmup.
# "small", the recipe's model, is post-norm, as Vaswani et al.'s: at 3+3 layers it trains stably
# under the recipe's short warmup and learns faster per step (Multi30k en-de, 30 minutes: validation
# loss 2.031 against pre-norm's 2.152, BLEU +0.85; bench/README.md, "Recipe search"). Its positions
# are rotary (Su et al. 2021) in both stacks, not sinusoids added to the embeddings: one-core models
# of 30 minutes validated at 1.775-1.803 against 1.819-1.838 for seven with sinusoids, in fewer
# steps, and the default two-model run scored BLEU 40.19 on test2016 against sinusoids' 38.97 and
# 39.41 (bench/README.md, "Rotary positions").
# "tiny" (the demo's) and "base" were not measured and stay pre-norm with sinusoids.
# Embeddings are scaled by sqrt(d_model) (and initialised at d_model**-0.5) so that token
# identity and the unit-amplitude sinusoids start on the same scale.
_FROM_SCRATCH = dict(scale_embeddings=True, dropout=0.1)
PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=128, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, d_ff=512, **_FROM_SCRATCH),
    "small": dict(
        d_model=256,
        n_heads=4,
        n_encoder_layers=3,
        n_decoder_layers=3,
        d_ff=1024,
        **_FROM_SCRATCH,
        norm_position="post",
        positions="rope",
    ),
    "base": dict(d_model=512, n_heads=8, n_encoder_layers=6, n_decoder_layers=6, d_ff=2048, **_FROM_SCRATCH),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    fields = dict(PRESETS[name])
    if overrides.get("architecture") == "decoder-only":
        fields["n_decoder_layers"] = fields["n_encoder_layers"] + fields["n_decoder_layers"]
        fields["n_encoder_layers"] = 0
        fields.setdefault("positions", "rope")
        # Post-norm was measured on translation only; a decoder-only stack twice as deep keeps pre-norm.
        fields["norm_position"] = "pre"
    fields.update(overrides)
    # A pre-norm stack needs the norm after its last layer; a post-norm one already ends in one.
    fields.setdefault("final_norm", fields.get("norm_position", "pre") != "post")
    return ModelConfig.from_dict(fields)
