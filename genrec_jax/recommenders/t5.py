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
  matmul_dtype: str = "float32"  # "bfloat16": matmul inputs cast to bf16, products summed
  #   and returned in float32; parameters, norms and softmaxes stay float32 (`contract`)


MATMUL_DTYPES = ("float32", "bfloat16")


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
  """RMS norm (T5, Qwen2): scale only, no mean subtraction, no bias."""

  def __init__(self, dim: int, eps: float = 1e-6):
    self.scale = nnx.Param(jnp.ones((dim,)))
    self.eps = eps

  def __call__(self, x):
    """Normalised in float32, returned in x's dtype (as HF's T5 and Qwen2 norms)."""
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    return ((x32 * jax.lax.rsqrt(variance + self.eps)).astype(x.dtype)
            * self.scale[...].astype(x.dtype))


@jax.custom_vjp
def _cpu_linear(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return x @ kernel


def _cpu_linear_fwd(x, kernel):
  return x @ kernel, (x, kernel)


def _cpu_linear_bwd(residuals, grad):
  """Kernel gradient as a plain row-major matmul over an explicitly transposed narrow operand.

  Left to itself, XLA:CPU computes x^T @ dy (a contraction over the N = batch x length rows) as
  an Eigen dot on a transposed copy of the wide operand (e.g. the [N, d_ff] ReLU gradient), at
  20-30 GFLOP/s instead of the ~75 of its YNNPACK kernels on a canonical matmul; at the DACT
  size that costs ~30 % of a train step. Transposing the narrow operand ([N, 128]) behind an
  optimization barrier keeps the big operand in place and the dot canonical.
  """
  x, kernel = residuals
  d_in, d_out = kernel.shape
  x2, grad2 = x.reshape(-1, d_in), grad.reshape(-1, d_out)
  if d_in <= d_out:
    grad_kernel = jax.lax.optimization_barrier(x2.T) @ grad2
  else:
    grad_kernel = jax.lax.optimization_barrier(jax.lax.optimization_barrier(grad2.T) @ x2).T
  return grad @ kernel.T, grad_kernel


_cpu_linear.defvjp(_cpu_linear_fwd, _cpu_linear_bwd)


def contract(spec: str, a: jax.Array, b: jax.Array, dtype: str = "float32") -> jax.Array:
  """`jnp.einsum(spec, a, b)`; with dtype "bfloat16" the inputs are cast to bf16 and the
  products accumulated and returned in float32 (mixed precision: bf16 matrix units, float32
  master weights and activations between matmuls)."""
  if dtype == "bfloat16":
    return jnp.einsum(spec, a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                      preferred_element_type=jnp.float32)
  return jnp.einsum(spec, a, b)


def linear(x: jax.Array, kernel: jax.Array, dtype: str = "float32") -> jax.Array:
  """x [..., d_in] @ kernel [d_in, d_out] (matmul inputs in `dtype`, see `contract`); in
  float32 on CPU with a backward pass shaped for XLA:CPU.

  Mathematically the plain matmul (tests/test_models.py compares the gradients); GPU/TPU
  compilers place transposes well on their own and get the plain matmul.
  """
  if dtype != "float32":
    return contract("...i,io->...o", x, kernel, dtype)
  if jax.default_backend() == "cpu":
    return _cpu_linear(x, kernel)
  return x @ kernel


class Dense(nnx.Module):
  """Bias-free linear layer (T5 has no biases) with normal(std) initialisation."""

  def __init__(self, d_in: int, d_out: int, std: float, rngs: nnx.Rngs,
               dtype: str = "float32"):
    self.kernel = nnx.Param(nnx.initializers.normal(std)(rngs.params(), (d_in, d_out)))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    return linear(x, self.kernel[...], self.dtype)


class Attention(nnx.Module):
  """Multi-head attention; mask [B, 1|H, Tq, Tk] bool and bias [1|B, H, Tq, Tk] additive.

  Keys/values may belong to fewer rows than the queries: with queries [B * G, Tq] and keys
  [B, Tk] (G beams of one example sharing its encoder output), the G query groups are folded
  into the query axis, so memory keys/values are projected once per example, not per beam.
  """

  def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
    inner = cfg.num_heads * cfg.d_kv
    self.num_heads, self.d_kv, self.dtype = cfg.num_heads, cfg.d_kv, cfg.matmul_dtype
    self.q = Dense(cfg.d_model, inner, (cfg.d_model * cfg.d_kv) ** -0.5, rngs, self.dtype)
    self.k = Dense(cfg.d_model, inner, cfg.d_model ** -0.5, rngs, self.dtype)
    self.v = Dense(cfg.d_model, inner, cfg.d_model ** -0.5, rngs, self.dtype)
    self.o = Dense(inner, cfg.d_model, inner ** -0.5, rngs, self.dtype)

  def _heads(self, x: jax.Array) -> jax.Array:
    """[B, T, H * d_kv] -> [B, T, H, d_kv]."""
    return x.reshape(*x.shape[:2], self.num_heads, self.d_kv)

  def project_kv(self, memory: jax.Array) -> tuple[jax.Array, jax.Array]:
    """memory [B, Tk, d_model] -> keys, values [B, Tk, H, d_kv] (one matmul for both)."""
    kv = linear(memory, jnp.concatenate([self.k.kernel[...], self.v.kernel[...]], axis=1),
                self.dtype)
    k, v = jnp.split(kv, 2, axis=-1)
    return self._heads(k), self._heads(v)

  def project_qkv(self, x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Self-attention inputs x [B, T, d_model] -> (queries [B, T, H * d_kv], (keys, values)
    [B, T, H, d_kv]) from one matmul: one wide dot runs faster than three narrow ones."""
    kernels = [self.q.kernel[...], self.k.kernel[...], self.v.kernel[...]]
    q, k, v = jnp.split(linear(x, jnp.concatenate(kernels, axis=1), self.dtype), 3, axis=-1)
    return q, (self._heads(k), self._heads(v))

  def __call__(self, x, kv, mask, bias, dropout_rate, key):
    """Attention of inputs x [B * G, Tq, d_model] over keys/values kv ([B, Tk, H, d_kv] each)."""
    return self.attend(self.q(x), kv, mask, bias, dropout_rate, key)

  def attend(self, q, kv, mask, bias, dropout_rate, key):
    """Projected queries q [B * G, Tq, H * d_kv] -> outputs [B * G, Tq, d_model]."""
    k, v = kv
    rows, tq, _ = q.shape
    b = k.shape[0]
    groups = rows // b
    q = q.reshape(b, groups * tq, self.num_heads, self.d_kv)
    logits = contract("bqhd,bkhd->bhqk", q, k, self.dtype)
    if bias is not None:
      logits = logits + bias
    logits = jnp.where(mask, logits, -1e9)
    weights = dropout(jax.nn.softmax(logits, axis=-1), dropout_rate, key)
    out = contract("bhqk,bkhd->bqhd", weights, v, self.dtype).reshape(rows, tq, -1)
    return self.o(out)


class FeedForward(nnx.Module):
  """ReLU MLP d_model -> d_ff -> d_model."""

  def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
    self.wi = Dense(cfg.d_model, cfg.d_ff, cfg.d_model ** -0.5, rngs, cfg.matmul_dtype)
    self.wo = Dense(cfg.d_ff, cfg.d_model, cfg.d_ff ** -0.5, rngs, cfg.matmul_dtype)

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
    q, (k, v) = self.self_attn.project_qkv(h)
    if past_kv is not None:
      k = jnp.concatenate([past_kv[0], k], axis=1)
      v = jnp.concatenate([past_kv[1], v], axis=1)
    h = self.self_attn.attend(q, (k, v), self_mask, self_bias, self.rate, keys[0])
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
    if cfg.matmul_dtype not in MATMUL_DTYPES:
      raise ValueError(f"T5 matmul_dtype must be one of {MATMUL_DTYPES}, got "
                       f"{cfg.matmul_dtype!r}")
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs,
                           embedding_init=nnx.initializers.normal(1.0))
    self.encoder = Stack(cfg, cfg.num_encoder_layers, False, rngs)
    self.decoder = Stack(cfg, cfg.num_decoder_layers, True, rngs)

  def encode(self, tokens: jax.Array | None, key: jax.Array | None = None, *,
             embeddings: jax.Array | None = None, mask: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array]:
    """Encoder states of token ids or of input vectors.

    Either tokens int32 [B, T] (0 = pad), or `embeddings` float [B, T, d_model] (per-position
    input vectors, e.g. `soft_embeddings` of soft identifiers) with `mask` bool [B, T] (True =
    a real position). Returns (states [B, T, d_model], mask bool [B, T]).
    """
    if (tokens is None) == (embeddings is None):
      raise ValueError("encode takes either tokens or embeddings (with mask)")
    if embeddings is None:
      embeddings, mask = self.embed(tokens), tokens > 0
    elif mask is None or mask.shape != embeddings.shape[:2]:
      raise ValueError(f"embedding inputs {embeddings.shape} need a mask of shape "
                       f"{embeddings.shape[:2]}")
    states, _ = self.encoder(embeddings, mask[:, None, None, :], key)
    return states, mask

  def soft_embeddings(self, probs: jax.Array, offset: int) -> jax.Array:
    """Input vectors of soft tokens: probs [..., K] over the K vocabulary entries starting at
    `offset` (one code level's tokens) -> probs @ those rows of the token table [..., d_model].
    A one-hot distribution gives exactly the embedding of its token."""
    rows = jax.lax.dynamic_slice_in_dim(self.embed.embedding[...], offset, probs.shape[-1])
    return probs @ rows

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
    return self.logits(self.decoder_states(memory, encoder_mask, decoder_tokens, key))

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
    h, cache = self._decoder_stack(memory, encoder_mask, decoder_tokens, None, cache)
    return self.logits(h[:, -1]), cache

  def decoder_states(self, memory, encoder_mask: jax.Array, decoder_tokens: jax.Array,
                     key: jax.Array | None = None) -> jax.Array:
    """Teacher-forced decoder states [R, S, d_model] for decoder inputs [R, S] (causal;
    `memory` as in `decode`): what `logits` maps to the vocabulary, and what methods that align
    the decoder's state with other signals read (ETEGRec's start-step state)."""
    return self._decoder_stack(memory, encoder_mask, decoder_tokens, key, None)[0]

  def _decoder_stack(self, memory, encoder_mask, decoder_tokens, key, cache):
    if not isinstance(memory, list):
      memory = self.decoder_memory(memory)
    s = decoder_tokens.shape[1]
    past = 0 if cache is None else cache[0][0].shape[1]
    causal = jnp.arange(past + s)[None, :] <= (past + jnp.arange(s))[:, None]
    return self.decoder(self.embed(decoder_tokens), causal[None, None], key, memory,
                        encoder_mask[:, None, None, :], cache)

  def logits(self, h: jax.Array) -> jax.Array:
    """Decoder states [..., d_model] -> vocabulary logits (tied embedding, T5 rescale)."""
    return contract("...d,vd->...v", h * self.cfg.d_model ** -0.5, self.embed.embedding[...],
                    self.cfg.matmul_dtype)

  def __call__(self, tokens, decoder_tokens, key=None, *, embeddings=None, mask=None):
    """Teacher-forced logits [B, S, vocab]; the encoder reads tokens or embeddings (`encode`)."""
    keys = _split(key, 2)
    encoded, mask = self.encode(tokens, keys[0], embeddings=embeddings, mask=mask)
    return self.decode(encoded, mask, decoder_tokens, keys[1])
