"""LoRA adapters (Hu et al. 2022) as wrappers of linear layers, the way PEFT applies them.

`apply_lora(model, cfg, rngs)` replaces every targeted linear layer of a model (by attribute
name: `q_proj`, `gate_proj`, ...) with `LoRALinear(base)`, which computes

    y = base(x) + (dropout(x) @ A @ B) * alpha / r,    A [d_in, r], B [r, d_out],

A drawn as PEFT draws it (Kaiming-uniform, bound 1/sqrt(d_in)) and B zero, so that a fresh
adapter leaves the model's outputs unchanged. The adapter's parameters are `LoRAParam`
variables in float32 whatever the base's dtype; the base layer's own parameters are untouched,
and a trainer that updates only `LoRAParam` variables (`training.trainer.Trainer` with a group
filtered by that type) leaves them bit-identical.

Adapter arithmetic used by the continual baselines works on the adapter trees alone
(`nnx.state(model, LoRAParam)`): `merge_adapters` (LSAT's entry-wise merge) and
`proximal_kl` (PESO's penalty).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from genrec_jax.recommenders.t5 import dropout


class LoRAParam(nnx.Param):
  """A trainable adapter matrix (A or B) of a `LoRALinear`."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """Adapter settings (defaults: LC-Rec's, DACT's LC-Rec backbone)."""

  rank: int = 8
  alpha: float = 32.0
  dropout: float = 0.05
  targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                              "up_proj", "down_proj")

  @property
  def scaling(self) -> float:
    return self.alpha / self.rank


class LoRALinear(nnx.Module):
  """A linear layer `base` ([..., d_in] -> [..., d_out], kernel [d_in, d_out]) plus a
  low-rank update; `key` drives the adapter's input dropout (None = evaluation)."""

  def __init__(self, base: nnx.Module, cfg: LoRAConfig, rngs: nnx.Rngs):
    d_in, d_out = base.kernel.shape
    bound = 1.0 / math.sqrt(d_in)
    self.base = base
    self.lora_a = LoRAParam(jax.random.uniform(rngs.params(), (d_in, cfg.rank), jnp.float32,
                                               -bound, bound))
    self.lora_b = LoRAParam(jnp.zeros((cfg.rank, d_out), jnp.float32))
    self.scaling, self.rate = cfg.scaling, cfg.dropout

  def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    update = (dropout(x.astype(jnp.float32), self.rate, key) @ self.lora_a[...]
              @ self.lora_b[...]) * self.scaling
    return (self.base(x) + update).astype(x.dtype)

  def merged_kernel(self) -> jax.Array:
    """The base kernel with the adapter folded in, float32 [d_in, d_out] (serving)."""
    return (self.base.kernel[...].astype(jnp.float32)
            + self.lora_a[...] @ self.lora_b[...] * self.scaling)


def apply_lora(model: nnx.Module, cfg: LoRAConfig, rngs: nnx.Rngs) -> int:
  """Wraps, in place, every submodule of `model` stored under an attribute named in
  `cfg.targets` in a `LoRALinear`; returns how many were wrapped (an error if none: a target
  list that matches nothing is a configuration mistake)."""
  if cfg.rank <= 0:
    raise ValueError(f"LoRA rank must be positive, got {cfg.rank}")
  targets = [(path, module) for path, module in nnx.iter_graph(model)
             if isinstance(module, nnx.Module) and path and path[-1] in cfg.targets
             and not isinstance(module, LoRALinear)]
  if not targets:
    raise ValueError(f"LoRA targets {cfg.targets} match no layer of {type(model).__name__}")
  for path, module in targets:
    parent = model
    for part in path[:-1]:
      parent = parent[part] if isinstance(part, int) else getattr(parent, part)
    setattr(parent, path[-1], LoRALinear(module, cfg, rngs))
  return len(targets)


def merge_adapters(long_term, short_term, weight: float):
  """Entry-wise merge weight * long + (1 - weight) * short of two adapter trees of the same
  structure (LSAT's adapter merge; A and B merged separately, as the method states)."""
  return jax.tree.map(lambda a, b: weight * a + (1.0 - weight) * b, long_term, short_term)


def _kl_of_flattened(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
  """KL(softmax(vec p) || softmax(vec q)) over all entries of two same-shaped matrices."""
  log_p = jax.nn.log_softmax(p_logits.reshape(-1))
  log_q = jax.nn.log_softmax(q_logits.reshape(-1))
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q))


def proximal_kl(adapters, previous) -> jax.Array:
  """PESO's proximal term before its weight lambda: the mean over adapted layers of
  KL(softmax(vec A) || softmax(vec A_prev)) + KL(softmax(vec B) || softmax(vec B_prev)).

  adapters, previous: adapter trees (`nnx.State` filtered by `LoRAParam`, or their pure
  dicts) of the same structure, each layer holding `lora_a` and `lora_b`."""
  new, old = jax.tree.leaves(adapters), jax.tree.leaves(previous)
  if len(new) != len(old) or not new or len(new) % 2:
    raise ValueError(f"proximal_kl needs two adapter trees of one structure (A and B per "
                     f"layer), got {len(new)} and {len(old)} matrices")
  return sum(_kl_of_flattened(a, b) for a, b in zip(new, old)) / (len(new) // 2)
