"""FLOP counts: XLA's cost analysis of compiled programs, the machine's dot peak, and
PyTorch's FlopCounterMode."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

def hlo_gflop(compiled) -> float | None:
  """XLA's FLOP count of a compiled executable (GFLOP), None if unavailable."""
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) / 1e9
  except Exception:  # pylint: disable=broad-except
    return None


def dot_peak_gflop_per_s(repeats: int = 10) -> dict:
  """This machine's fp32 matmul speed through XLA at the model's shapes (the best of canonical
  [N, 128] x [128, 1024], [N, 1024] x [1024, 128] and [N, 128] x [128, 1152] dots, N = 6144):
  the roofline that any exact implementation of the same FLOPs runs into."""
  out = {}
  for m, k, n in [(6144, 128, 1024), (6144, 1024, 128), (6144, 128, 1152)]:
    a, b = jnp.ones((m, k)), jnp.ones((k, n))
    fn = jax.jit(jnp.matmul).lower(a, b).compile()
    jax.block_until_ready(fn(a, b))
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(a, b))
      times.append(time.perf_counter() - t0)
    out[f"{m}x{k}x{n}"] = 2 * m * k * n / min(times) / 1e9
  out["best"] = max(out.values())
  return out


def weighted_gflop_per_unit(gflop_by_tokens: dict, summary: dict, unit: str) -> float | None:
  """XLA GFLOP of a full pass (GFLOP per batch shape x batches of that shape) per sample/user."""
  counts = summary["batches_by_tokens"]
  if any(gflop_by_tokens.get(k) is None for k in counts):
    return None
  return sum(gflop_by_tokens[k] * n for k, n in counts.items()) / summary[f"full_pass_{unit}"]


def torch_gflop(fn) -> float:
  """FLOPs of one call of fn (torch's FlopCounterMode: matmuls and attention, GFLOP)."""
  from torch.utils.flop_counter import FlopCounterMode
  with FlopCounterMode(display=False) as counter:
    fn()
  return counter.get_total_flops() / 1e9


