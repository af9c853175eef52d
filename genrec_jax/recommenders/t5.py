"""T5-style encoder-decoder (the TIGER generative recommender), Flax NNX.

T5 v1.0 layout as used by TIGER/DACT through HF `T5ForConditionalGeneration`: pre-LN blocks with
RMS norm, no biases, ReLU feed-forward, bucketed relative position bias computed in the first layer
of each stack and shared by the others, unscaled dot-product attention (the scale is folded into
the initialisation), tied input/output embedding with the d_model^-0.5 rescale.

Dropout takes an explicit PRNG key so that train steps are pure functions of (state, batch, key).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Sizes of the T5 recommender (defaults: the DACT/TIGER preset)."""

  vocab_size: int
  d_model: int = 128
  d_ff: int = 1024
  num_heads: int = 6
  d_kv: int = 64
  num_encoder_layers: int = 4
  num_decoder_layers: int = 4
  dropout_rate: float = 0.1
  relative_buckets: int = 32
  relative_max_distance: int = 128


def _mix32(h: jax.Array) -> jax.Array:
  """lowbias32 integer hash, a bijection of uint32 with good avalanche."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x7FEB352D)
  h = h ^ (h >> 15)
  h = h * jnp.uint32(0x846CA68B)
  return h ^ (h >> 16)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout; identity when key is None (evaluation) or rate == 0.

  The keep mask is a counter-based hash of (element index, two 32-bit seeds drawn from `key`)
  rather than `jax.random.bernoulli`: threefry evaluates a full hash per element and XLA
  materialises the random bits (two words per element, ~60 % of a CPU train step and ~1 GiB at
  the DACT size), while this elementwise hash fuses into its consumers and is recomputed in the
  backward pass. Masks of different keys are uncorrelated (tests/test_models.py checks the keep
  rate and the correlation); the hash is not cryptographic, which dropout does not need.
  """
  if key is None or rate == 0.0:
    return x
  seeds = jax.random.bits(key, (2,), jnp.uint32)
  index = jnp.zeros(x.shape, jnp.uint32)
  stride = 1
  for axis in range(x.ndim - 1, -1, -1):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride)
    stride *= x.shape[axis]
  bits = _mix32(_mix32(index ^ seeds[0]) + seeds[1])
  keep = bits >= jnp.uint32(min(int(round(rate * 2.0 ** 32)), 2 ** 32 - 1))
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def _split(key: jax.Array | None, n: int) -> list[jax.Array | None]:
  return [None] * n if key is None else list(jax.random.split(key, n))


def relative_position_bucket(relative_position: jax.Array, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> jax.Array:
  """T5 bucketing of (key - query) offsets: exact for small offsets, logarithmic beyond."""
  buckets = 0
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    buckets += (n < 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  large = max_exact + (jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact) /
                       np.log(max_distance / max_exact) * (num_buckets - max_exact)
                       ).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(is_small, n, large)


class RMSNorm(nnx.Module):
  """T5 layer norm: scale only, no mean subtraction, no bias."""

  def __init__(self, dim: int, eps: float = 1e-6):
    self.scale = nnx.Param(jnp.ones((dim,)))
    self.eps = eps

  def __call__(self, x):
    variance = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(variance + self.eps) * self.scale[...]


def _dense(din: int, dout: int, std: float, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(din, dout, use_bias=False, rngs=rngs,
                    kernel_init=nnx.initializers.normal(std))


class Attention(nnx.Module):
  """Multi-head attention; mask [B, 1|H, Tq, Tk] bool and bias [1|B, H, Tq, Tk] additive.

  Keys/values may belong to fewer rows than the queries: with queries [B * G, Tq] and keys
  [B, Tk] (G beams of one example sharing its encoder output), the G query groups are folded
  into the query axis, so memory keys/values are projected once per example, not per beam.
  """

  def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
    inner = cfg.num_heads * cfg.d_kv
    self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv
    self.q = _dense(cfg.d_model, inner, (cfg.d_model * cfg.d_kv) ** -0.5, rngs)
    self.k = _dense(cfg.d_model, inner, cfg.d_model ** -0.5, rngs)
    self.v = _dense(cfg.d_model, inner, cfg.d_model ** -0.5, rngs)
    self.o = _dense(inner, cfg.d_model, inner ** -0.5, rngs)

  def project_kv(self, memory: jax.Array) -> tuple[jax.Array, jax.Array]:
    """memory [B, Tk, d_model] -> keys, values [B, Tk, H, d_kv]."""
    b, t, _ = memory.shape
    shape = (b, t, self.num_heads, self.d_kv)
    return self.k(memory).reshape(shape), self.v(memory).reshape(shape)

  def __call__(self, x, kv, mask, bias, dropout_rate, key):
    k, v = kv
    rows, tq, _ = x.shape
    b = k.shape[0]
    groups = rows // b
    q = self.q(x).reshape(b, groups * tq, self.num_heads, self.d_kv)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    if bias is not None:
      logits = logits + bias
    logits = jnp.where(mask, logits, -1e9)
    weights = dropout(jax.nn.softmax(logits, axis=-1), dropout_rate, key)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(rows, tq, -1)
    return self.o(out)


class FeedForward(nnx.Module):
  """ReLU MLP d_model -> d_ff -> d_model."""

  def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
    self.wi = _dense(cfg.d_model, cfg.d_ff, cfg.d_model ** -0.5, rngs)
    self.wo = _dense(cfg.d_ff, cfg.d_model, cfg.d_ff ** -0.5, rngs)

  def __call__(self, x, dropout_rate, key):
    return self.wo(dropout(jax.nn.relu(self.wi(x)), dropout_rate, key))


class Block(nnx.Module):
  """Pre-LN block: self-attention, optional cross-attention, feed-forward."""

  def __init__(self, cfg: T5Config, cross: bool, rngs: nnx.Rngs):
    self.rate = cfg.dropout_rate
    self.self_norm = RMSNorm(cfg.d_model)
    self.self_attn = Attention(cfg, rngs)
    self.cross_norm = RMSNorm(cfg.d_model) if cross else None
    self.cross_attn = Attention(cfg, rngs) if cross else None
    self.ff_norm = RMSNorm(cfg.d_model)
    self.ff = FeedForward(cfg, rngs)

  def __call__(self, x, self_mask, self_bias, key, memory_kv=None, memory_mask=None,
               past_kv=None):
    """x [B, T, d_model] -> (x, self-attention keys/values [B, P + T, H, d_kv]).

    `past_kv` holds the keys/values of P earlier positions (incremental decoding); the returned
    keys/values extend it with this call's T positions.
    """
    keys = _split(key, 6)
    h = self.self_norm(x)
    k, v = self.self_attn.project_kv(h)
    if past_kv is not None:
      k = jnp.concatenate([past_kv[0], k], axis=1)
      v = jnp.concatenate([past_kv[1], v], axis=1)
    h = self.self_attn(h, (k, v), self_mask, self_bias, self.rate, keys[0])
    x = x + dropout(h, self.rate, keys[1])
    if self.cross_attn is not None:
      h = self.cross_attn(self.cross_norm(x), memory_kv, memory_mask, None, self.rate, keys[2])
      x = x + dropout(h, self.rate, keys[3])
    h = self.ff(self.ff_norm(x), self.rate, keys[4])
    return x + dropout(h, self.rate, keys[5]), (k, v)


class Stack(nnx.Module):
  """Encoder or decoder stack with a shared relative position bias."""

  def __init__(self, cfg: T5Config, num_layers: int, decoder: bool, rngs: nnx.Rngs):
    self.cfg, self.decoder = cfg, decoder
    self.relative_bias = nnx.Embed(cfg.relative_buckets, cfg.num_heads, rngs=rngs,
                                   embedding_init=nnx.initializers.normal(cfg.d_model ** -0.5))
    self.blocks = nnx.List([Block(cfg, decoder, rngs) for _ in range(num_layers)])
    self.final_norm = RMSNorm(cfg.d_model)

  def position_bias(self, tq: int, tk: int, query_offset: int = 0) -> jax.Array:
    """[1, H, tq, tk] additive bias from bucketed key - query offsets; queries sit at positions
    query_offset .. query_offset + tq - 1, keys at 0 .. tk - 1."""
    rel = jnp.arange(tk)[None, :] - (query_offset + jnp.arange(tq))[:, None]
    buckets = relative_position_bucket(rel, not self.decoder, self.cfg.relative_buckets,
                                       self.cfg.relative_max_distance)
    return jnp.transpose(self.relative_bias(buckets), (2, 0, 1))[None]

  def memory_kv(self, memory: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
    """Cross-attention keys/values of every block for encoder states [B, Tk, d_model]."""
    return [block.cross_attn.project_kv(memory) for block in self.blocks]

  def __call__(self, x, self_mask, key, memory_kv=None, memory_mask=None, cache=None):
    """Embedded inputs x [B, T, d_model] -> (states [B, T, d_model], per-block self-attention
    keys/values [B, P + T, H, d_kv]).

    `cache` (decoder only) holds every block's keys/values of P earlier positions, so that
    incremental decoding runs the stack on new positions only; self_mask is then
    [B|1, 1, T, P + T].
    """
    t = x.shape[1]
    past = 0 if cache is None else cache[0][0].shape[1]
    bias = self.position_bias(t, past + t, past)
    keys = _split(key, len(self.blocks) + 2)
    x = dropout(x, self.cfg.dropout_rate, keys[-2])
    new_cache = []
    for i, (block, k) in enumerate(zip(self.blocks, keys)):
      x, kv = block(x, self_mask, bias, k, None if memory_kv is None else memory_kv[i],
                    memory_mask, None if cache is None else cache[i])
      new_cache.append(kv)
    return dropout(self.final_norm(x), self.cfg.dropout_rate, keys[-1]), new_cache


class T5(nnx.Module):
  """Encoder-decoder over identifier tokens (pad/start token 0)."""

  def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs,
                           embedding_init=nnx.initializers.normal(1.0))
    self.encoder = Stack(cfg, cfg.num_encoder_layers, False, rngs)
    self.decoder = Stack(cfg, cfg.num_decoder_layers, True, rngs)

  def encode(self, tokens: jax.Array, key: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array]:
    """tokens int32 [B, T] (0 = pad) -> (states [B, T, d_model], mask bool [B, T])."""
    mask = tokens > 0
    states, _ = self.encoder(self.embed(tokens), mask[:, None, None, :], key)
    return states, mask

  def decoder_memory(self, encoded: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
    """Per-block cross-attention keys/values of encoder states [B, T, d_model], computed once
    and reused by every decoding step and every beam."""
    return self.decoder.memory_kv(encoded)

  def decode(self, memory, encoder_mask: jax.Array, decoder_tokens: jax.Array,
             key: jax.Array | None = None) -> jax.Array:
    """Logits [B * G, S, vocab] for decoder inputs [B * G, S] (start token 0 first), causal.

    `memory` is either encoder states [B, T, d_model] or their `decoder_memory`; G >= 1 decoder
    rows per example (beams) share it, rows grouped by example (teacher forcing, scoring).
    """
    h, _ = self._decoder_states(memory, encoder_mask, decoder_tokens, key, None)
    return self._logits(h)

  def init_cache(self, rows: int) -> list[tuple[jax.Array, jax.Array]]:
    """An empty decoder self-attention cache for `rows` decoder rows (no positions yet)."""
    empty = jnp.zeros((rows, 0, self.cfg.num_heads, self.cfg.d_kv), jnp.float32)
    return [(empty, empty) for _ in self.decoder.blocks]

  def decode_step(self, memory, encoder_mask: jax.Array, decoder_tokens: jax.Array,
                  cache: list[tuple[jax.Array, jax.Array]]
                  ) -> tuple[jax.Array, list[tuple[jax.Array, jax.Array]]]:
    """Incremental decoding: the next-token logits [R, vocab] after decoder inputs [R, S] that
    follow the P positions held in `cache` ([R, P, H, d_kv] per block), and the cache extended
    by S positions. Equal to `decode` on the whole prefix at its last position, at the cost of
    the new positions only; R = B * G rows share `memory` as in `decode`."""
    h, cache = self._decoder_states(memory, encoder_mask, decoder_tokens, None, cache)
    return self._logits(h[:, -1]), cache

  def _decoder_states(self, memory, encoder_mask, decoder_tokens, key, cache):
    if not isinstance(memory, list):
      memory = self.decoder_memory(memory)
    s = decoder_tokens.shape[1]
    past = 0 if cache is None else cache[0][0].shape[1]
    causal = jnp.arange(past + s)[None, :] <= (past + jnp.arange(s))[:, None]
    return self.decoder(self.embed(decoder_tokens), causal[None, None], key, memory,
                        encoder_mask[:, None, None, :], cache)

  def _logits(self, h: jax.Array) -> jax.Array:
    """Decoder states [..., d_model] -> vocabulary logits (tied embedding, T5 rescale)."""
    return (h * self.cfg.d_model ** -0.5) @ self.embed.embedding[...].T

  def __call__(self, tokens, decoder_tokens, key=None):
    keys = _split(key, 2)
    encoded, mask = self.encode(tokens, keys[0])
    return self.decode(encoded, mask, decoder_tokens, keys[1])
