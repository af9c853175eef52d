"""Qwen2 decoder-only transformer (the LC-Rec backbone of DACT Table 3), Flax NNX.

The architecture of Hugging Face `Qwen2ForCausalLM` (Qwen2 / Qwen2.5): pre-norm blocks with RMS
norm, rotary positions (the "rotate half" layout, base `rope_theta`), grouped-query attention
(`num_kv_heads` key/value heads shared by groups of query heads) with biases on the q/k/v
projections and none on the output projection, a SwiGLU MLP (down(silu(gate(x)) * up(x))), a
final norm, and an output layer tied to the input embedding or separate. Parameter names follow
the checkpoint's (`q_proj`, `gate_proj`, `input_layernorm`, ...) so that
`recommenders.hf_checkpoint` maps them one to one; kernels are stored [in, out].

Padding may sit anywhere in a row: a row's real tokens attend to its earlier real tokens only,
and their rotary positions count real tokens (`positions_from_mask`), so that a padded row gives
the logits of the same row without padding (what HF gives with position ids computed from the
attention mask, as its `generate` does; its plain forward pass numbers padded positions too).

Precision: `dtype` is the activations' and matmul inputs' type, `param_dtype` the stored base
weights' type; norms, the attention softmax and the rotary tables are computed in float32.
LoRA adapters (`recommenders.lora`) keep float32 parameters whatever these are.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from genrec_jax.recommenders.t5 import RMSNorm, contract, linear

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
  """Sizes of a Qwen2 model (defaults: Qwen2.5-1.5B-Instruct, the paper's backbone)."""

  vocab_size: int = 151936
  hidden_size: int = 1536
  intermediate_size: int = 8960
  num_layers: int = 28
  num_heads: int = 12
  num_kv_heads: int = 2
  head_dim: int = 0  # 0: hidden_size // num_heads
  rope_theta: float = 1e6
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = True
  initializer_range: float = 0.02  # std of the random initialisation (no checkpoint)
  dtype: str = "float32"  # activations and matmul inputs
  param_dtype: str = "float32"  # stored base weights

  @property
  def head_size(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  def check(self) -> None:
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"Qwen2 {name} must be one of {DTYPES}, got {getattr(self, name)!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"Qwen2 num_heads {self.num_heads} must be a multiple of num_kv_heads "
                       f"{self.num_kv_heads}")
    if self.head_size % 2:
      raise ValueError(f"Qwen2 head size {self.head_size} must be even (rotary pairs)")

  @classmethod
  def from_hf(cls, hf: dict, **overrides) -> "Qwen2Config":
    """The config of a Hugging Face `config.json` (a Qwen2 model), with field overrides
    (dtype, param_dtype)."""
    if hf.get("model_type") != "qwen2":
      raise ValueError(f"config.json describes model_type {hf.get('model_type')!r}; only "
                       f"'qwen2' (Qwen2 / Qwen2.5) checkpoints are supported")
    if hf.get("use_sliding_window", False):
      raise ValueError("config.json sets use_sliding_window: sliding-window attention is not "
                       "implemented; use a checkpoint with full attention")
    # transformers < 5 writes rope_theta and rope_scaling; >= 5 writes rope_parameters.
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
      raise ValueError(f"config.json sets rotary scaling {rope}; only default rotary "
                       f"positions are implemented")
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    if hf.get("hidden_act", "silu") != "silu":
      raise ValueError(f"config.json sets hidden_act {hf['hidden_act']!r}; Qwen2 uses 'silu'")
    fields = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
        head_dim=hf.get("head_dim") or 0, rope_theta=float(theta),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        initializer_range=float(hf.get("initializer_range", 0.02)))
    return cls(**{**fields, **overrides})


class Linear(nnx.Module):
  """x [..., d_in] @ kernel [d_in, d_out] (+ bias), matmul inputs in `dtype`, the result in
  `dtype` (float32 accumulation)."""

  def __init__(self, d_in: int, d_out: int, *, bias: bool, std: float, dtype: str,
               param_dtype: str, rngs: nnx.Rngs):
    self.kernel = nnx.Param(nnx.initializers.normal(std)(rngs.params(), (d_in, d_out),
                                                         jnp.dtype(param_dtype)))
    self.bias = nnx.Param(jnp.zeros((d_out,), jnp.dtype(param_dtype))) if bias else None
    self.dtype = dtype

  def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """`key` is accepted for the LoRA wrapper's dropout and unused here."""
    del key
    y = linear(x, self.kernel[...], self.dtype)  # float32 on CPU: a backward pass for XLA:CPU
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


def positions_from_mask(mask: jax.Array, start: jax.Array | int = 0) -> jax.Array:
  """Rotary positions int32 [B, T] of the tokens of rows with real-token mask bool [B, T]: the
  number of real tokens before each one, plus `start` ([B] or scalar: tokens already cached).
  Padding gets the position of the next real token (it is masked out anyway)."""
  before = jnp.cumsum(mask.astype(jnp.int32), axis=1) - mask.astype(jnp.int32)
  return before + jnp.asarray(start, jnp.int32).reshape(-1, 1)


def rotary_tables(positions: jax.Array, head_size: int, theta: float
                  ) -> tuple[jax.Array, jax.Array]:
  """cos, sin float32 [B, T, head_size] of positions int [B, T] (HF's default rotary
  embedding: frequencies theta^(-2i/head_size), each repeated for both halves)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_size, 2, dtype=jnp.float32) / head_size))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates x [B, T, heads, head_size] by the tables [B, T, head_size] (rotate-half layout)."""
  half = x.shape[-1] // 2
  x32 = x.astype(jnp.float32)
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


KVCache = list  # per layer (keys, values), each [B, P, num_kv_heads, head_size]


class Attention(nnx.Module):
  """Grouped-query self-attention with rotary positions."""

  def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs):
    d, hd, std = cfg.hidden_size, cfg.head_size, cfg.initializer_range
    common = dict(std=std, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.q_proj = Linear(d, cfg.num_heads * hd, bias=True, **common)
    self.k_proj = Linear(d, cfg.num_kv_heads * hd, bias=True, **common)
    self.v_proj = Linear(d, cfg.num_kv_heads * hd, bias=True, **common)
    self.o_proj = Linear(cfg.num_heads * hd, d, bias=False, **common)
    self.num_heads, self.num_kv_heads, self.head_size = cfg.num_heads, cfg.num_kv_heads, hd
    self.dtype = cfg.dtype

  def __call__(self, x, cos, sin, mask, past, keys):
    """x [B, T, d] -> (outputs [B, T, d], keys/values [B, P + T, KV, hd] extending `past`).

    mask bool [B, 1, T, P + T]: which cached and new positions each query sees."""
    b, t, _ = x.shape
    q = self.q_proj(x, keys[0]).reshape(b, t, self.num_heads, self.head_size)
    k = self.k_proj(x, keys[1]).reshape(b, t, self.num_kv_heads, self.head_size)
    v = self.v_proj(x, keys[2]).reshape(b, t, self.num_kv_heads, self.head_size)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if past is not None:
      k = jnp.concatenate([past[0], k], axis=1)
      v = jnp.concatenate([past[1], v], axis=1)
    groups = self.num_heads // self.num_kv_heads
    q = q.reshape(b, t, self.num_kv_heads, groups, self.head_size)
    logits = contract("btkgd,bskd->bkgts", q, k, self.dtype) * self.head_size ** -0.5
    logits = jnp.where(mask[:, :, None], logits, -1e30)  # [B, KV, G, T, S]
    weights = jax.nn.softmax(logits, axis=-1)
    out = contract("bkgts,bskd->btkgd", weights, v, self.dtype).astype(self.dtype)
    return self.o_proj(out.reshape(b, t, -1), keys[3]), (k, v)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs):
    common = dict(bias=False, std=cfg.initializer_range, dtype=cfg.dtype,
                  param_dtype=cfg.param_dtype, rngs=rngs)
    self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, **common)
    self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, **common)
    self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, **common)

  def __call__(self, x, keys):
    return self.down_proj(jax.nn.silu(self.gate_proj(x, keys[0])) * self.up_proj(x, keys[1]),
                          keys[2])


class Layer(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x))."""

  def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.self_attn = Attention(cfg, rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x, cos, sin, mask, past, key):
    keys = [None] * 7 if key is None else list(jax.random.split(key, 7))
    h, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, past, keys[:4])
    x = x + h
    return x + self.mlp(self.post_attention_layernorm(x), keys[4:]), kv


class Qwen2(nnx.Module):
  """The decoder stack: token embedding, layers, final norm, output layer.

  `embed_tokens.embedding` [V, d] holds the vocabulary; `lm_head` (None when tied) maps states
  to vocabulary logits. `key` (dropout of LoRA adapters, if any) is None at evaluation.
  """

  def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
    cfg.check()
    self.cfg = cfg
    self.embed_tokens = nnx.Embed(
        cfg.vocab_size, cfg.hidden_size, rngs=rngs, param_dtype=jnp.dtype(cfg.param_dtype),
        embedding_init=nnx.initializers.normal(cfg.initializer_range))
    self.layers = nnx.List([Layer(cfg, rngs) for _ in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.lm_head = None if cfg.tie_word_embeddings else Linear(
        cfg.hidden_size, cfg.vocab_size, bias=False, std=cfg.initializer_range,
        dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

  def init_cache(self, rows: int) -> KVCache:
    """An empty key/value cache for `rows` rows (no positions yet)."""
    empty = jnp.zeros((rows, 0, self.cfg.num_kv_heads, self.cfg.head_size),
                      jnp.dtype(self.cfg.dtype))
    return [(empty, empty) for _ in self.layers]

  def states(self, embeddings: jax.Array, positions: jax.Array, mask: jax.Array,
             cache: KVCache | None = None, key: jax.Array | None = None
             ) -> tuple[jax.Array, KVCache]:
    """Final-norm states [B, T, d] of input vectors [B, T, d] at rotary positions int [B, T].

    mask bool [B, 1, T, P + T]: the positions each query attends to, among the P cached ones
    (`cache`, per layer [B, P, KV, hd]) and the T new ones. Returns the states and the cache
    extended by the T new positions."""
    cos, sin = rotary_tables(positions, self.cfg.head_size, self.cfg.rope_theta)
    keys = [None] * len(self.layers) if key is None else list(
        jax.random.split(key, len(self.layers)))
    x, new_cache = embeddings.astype(self.cfg.dtype), []
    for i, layer in enumerate(self.layers):
      x, kv = layer(x, cos, sin, mask, None if cache is None else cache[i], keys[i])
      new_cache.append(kv)
    return self.norm(x), new_cache

  def logits(self, h: jax.Array) -> jax.Array:
    """States [..., d] -> float32 logits [..., V]."""
    if self.lm_head is None:
      return contract("...d,vd->...v", h, self.embed_tokens.embedding[...], self.cfg.dtype)
    return self.lm_head(h).astype(jnp.float32)

  def __call__(self, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Logits float32 [B, T, V] of token ids [B, T] with real-token mask bool [B, T] (default
    all real): causal attention over the real tokens, positions counting real tokens."""
    mask = jnp.ones(tokens.shape, bool) if mask is None else mask
    h, _ = self.states(self.embed_tokens(tokens), positions_from_mask(mask),
                       causal_mask(mask))
    return self.logits(h)


def causal_mask(mask: jax.Array, past_mask: jax.Array | None = None) -> jax.Array:
  """Attention mask bool [B, 1, T, P + T] of T new tokens (real-token mask [B, T]) after P
  cached ones (`past_mask` [B, P], None = none): each query sees the real cached tokens and
  the real new tokens up to itself; a padding query sees itself (its output is unused, and a
  row with nothing visible would be an all-masked softmax)."""
  t = mask.shape[1]
  past = 0 if past_mask is None else past_mask.shape[1]
  causal = jnp.arange(past + t)[None, :] <= (past + jnp.arange(t))[:, None]  # [T, P + T]
  keys = mask if past_mask is None else jnp.concatenate([past_mask, mask], axis=1)
  own = jnp.arange(past + t)[None, :] == (past + jnp.arange(t))[:, None]
  return ((causal[None] & keys[:, None, :]) | own[None])[:, None]
