"""Report of a benchmark run: machine information and the JAX vs. torch table."""

from __future__ import annotations

import os
import platform

import jax

from tools.bench.harness import loadavg

def machine_info() -> dict:
  info = {
      "cpu_count": os.cpu_count(),
      "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
      "platform": platform.platform(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jax_backend": jax.default_backend(),
      "jax_devices": [str(d) for d in jax.devices()],
      "loadavg_at_start": loadavg(),
  }
  try:
    import flax
    info["flax"] = flax.__version__
  except ImportError:
    pass
  try:
    with open("/proc/cpuinfo") as f:
      names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
    info["cpu_model"] = names[0] if names else None
  except OSError:
    pass
  try:
    with open("/proc/meminfo") as f:
      info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
  except OSError:
    pass
  return info


def fmt(v, digits=2):
  if v is None:
    return "-"
  if isinstance(v, str):
    return v
  return f"{v:,.{digits}f}"


def table_rows(res: dict) -> list[tuple[str, str, str, str]]:
  j, t = res["jax"], res.get("torch") or {}
  rows = []

  def add(name, jv, tv, digits=2, ratio=True):
    r = jv / tv if (ratio and jv is not None and tv) else None
    rows.append((name, fmt(jv, digits), fmt(tv, digits), fmt(r, 2) + ("x" if r else "")))

  tt, tg = t.get("train", {}), t.get("generate", {})
  add("train samples/s (JAX bucketed, torch 80 tok)", j["train_bucketed"]["samples_per_s"],
      tt.get("samples_per_s"), 1)
  add("train steps/s (JAX bucketed, torch 80 tok)", j["train_bucketed"]["steps_per_s"],
      tt.get("steps_per_s"), 3)
  add("train samples/s (both 80 tok)", j["train_fixed80"]["samples_per_s"],
      tt.get("samples_per_s"), 1)
  add("beam search users/s (JAX bucketed, torch 80 tok)", j["beam_bucketed"]["users_per_s"],
      tg.get("users_per_s"), 1)
  if "beam_fixed80" in j:
    add("beam search users/s (both 80 tok)", j["beam_fixed80"]["users_per_s"],
        tg.get("users_per_s"), 1)
  add("train samples/s, fastest step per shape (JAX bucketed, torch 80 tok)",
      j["train_bucketed"]["samples_per_s_best"], tt.get("samples_per_s_best"), 1)
  add("beam search users/s, fastest batch per shape (JAX bucketed, torch 80 tok)",
      j["beam_bucketed"]["users_per_s_best"], tg.get("users_per_s_best"), 1)
  f = res.get("flops", {})
  add("GFLOP per train sample (JAX bucketed, torch 80 tok)", f.get("jax_train_gflop_per_sample"),
      f.get("torch_train_gflop_per_sample"), 3)
  add("GFLOP per beam-searched user (JAX bucketed, torch 80 tok)",
      f.get("jax_beam_gflop_per_user"), f.get("torch_beam_gflop_per_user"), 3)
  add("achieved GFLOP/s, train", f.get("jax_train_gflop_per_s"), f.get("torch_train_gflop_per_s"),
      1)
  add("achieved GFLOP/s, beam search", f.get("jax_beam_gflop_per_s"),
      f.get("torch_beam_gflop_per_s"), 1)
  add("fp32 dot peak GFLOP/s of this machine (XLA)",
      (f.get("dot_peak_gflop_per_s") or {}).get("best"), None, 1, ratio=False)
  add("beam search JAX / torch if JAX ran at the dot peak", f.get("beam_ratio_bound_at_dot_peak"),
      None, 1, ratio=False)
  add("peak RSS MiB, train warm-up (80 tok)", j["train_bucketed"]["peak_rss_mib"],
      tt.get("peak_rss_mib"), 0)
  add("peak RSS MiB, beam search warm-up (80 tok)", j["beam_bucketed"]["peak_rss_mib"],
      tg.get("peak_rss_mib"), 0)
  add("cpu/wall during train (cores really used)", j["train_bucketed"]["cpu_per_wall"],
      tt.get("cpu_per_wall"), 2, ratio=False)
  add("JAX compile s (train, all shapes)", j["compile_s"]["train"], None, 1, ratio=False)
  add("JAX compile s (beam search, all shapes)", j["compile_s"]["beam"], None, 1, ratio=False)
  return rows


def markdown_table(rows) -> str:
  head = ("metric", "JAX", "torch", "JAX / torch")
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines)
