"""SASRec (Kang & McAuley, 2018) in Flax NNX: causal self-attention over item sequences.

It supplies the collaborative (CF) item embeddings that LETTER, DACT, ETEGRec and UniGRec feed
their tokenizers, and is evaluated as a discriminative full-catalog baseline.

Items are encoded as index + 1 (0 = padding). Sequences are left-padded; positions are counted
from the most recent item, which equals the original's absolute positions over a fixed-length
left-padded window and stays valid when batches are cut to shorter length buckets.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from genrec_jax.recommenders.t5 import dropout


@dataclasses.dataclass(frozen=True)
class SASRecConfig:
  """Sizes of SASRec."""

  num_items: int
  hidden_dim: int = 64
  num_layers: int = 2
  num_heads: int = 2
  max_len: int = 50
  dropout_rate: float = 0.2


class SASRecBlock(nnx.Module):
  """Pre-LN causal self-attention + point-wise feed-forward (GELU)."""

  def __init__(self, cfg: SASRecConfig, rngs: nnx.Rngs):
    d = cfg.hidden_dim
    self.rate = cfg.dropout_rate
    self.attn_norm = nnx.LayerNorm(d, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=cfg.num_heads, in_features=d, decode=False,
                                       dropout_rate=0.0, rngs=rngs)
    self.ff_norm = nnx.LayerNorm(d, rngs=rngs)
    self.ff_in = nnx.Linear(d, d, rngs=rngs)
    self.ff_out = nnx.Linear(d, d, rngs=rngs)

  def __call__(self, x, mask, key):
    keys = [None] * 3 if key is None else list(jax.random.split(key, 3))
    h = self.attn_norm(x)
    x = x + dropout(self.attn(h, h, h, mask=mask), self.rate, keys[0])
    h = dropout(jax.nn.gelu(self.ff_in(self.ff_norm(x))), self.rate, keys[1])
    return x + dropout(self.ff_out(h), self.rate, keys[2])


class SASRec(nnx.Module):
  """Next-item model; `__call__` returns hidden states [B, T, d] for sequences [B, T]."""

  def __init__(self, cfg: SASRecConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    init = nnx.initializers.normal(cfg.hidden_dim ** -0.5)
    self.item_embed = nnx.Embed(cfg.num_items + 1, cfg.hidden_dim, embedding_init=init,
                                rngs=rngs)
    self.pos_embed = nnx.Embed(cfg.max_len, cfg.hidden_dim, embedding_init=init, rngs=rngs)
    self.blocks = nnx.List([SASRecBlock(cfg, rngs) for _ in range(cfg.num_layers)])
    self.final_norm = nnx.LayerNorm(cfg.hidden_dim, rngs=rngs)

  def __call__(self, seq: jax.Array, key: jax.Array | None = None) -> jax.Array:
    t = seq.shape[1]
    if t > self.cfg.max_len:
      raise ValueError(f"sequence length {t} exceeds SASRec max_len {self.cfg.max_len}")
    keys = [None] * (len(self.blocks) + 1) if key is None else list(
        jax.random.split(key, len(self.blocks) + 1))
    positions = jnp.arange(t - 1, -1, -1)  # most recent item = position 0
    x = self.item_embed(seq) * self.cfg.hidden_dim ** 0.5 + self.pos_embed(positions)[None]
    valid = seq > 0
    x = dropout(x, self.cfg.dropout_rate, keys[-1]) * valid[..., None]
    causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
    mask = causal & valid[:, None, None, :]
    # Fully padded query rows (left padding) attend to themselves so softmax stays defined.
    mask = mask | jnp.eye(t, dtype=bool)[None, None]
    for block, k in zip(self.blocks, keys[:-1]):
      x = block(x, mask, k) * valid[..., None]
    return self.final_norm(x)

  def item_embeddings(self) -> jax.Array:
    """CF embeddings of the items, [num_items, d] (padding row dropped)."""
    return self.item_embed.embedding[...][1:]

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Scores of every item, [..., num_items], for hidden states [..., d]."""
    return hidden @ self.item_embeddings().T
