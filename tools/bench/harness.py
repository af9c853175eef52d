"""Timing harness of the benchmarks: logging, peak memory, interleaved timed phases and
throughput weighted over a full pass."""

from __future__ import annotations

import collections
import dataclasses
import os
import resource
import time

import numpy as np

def log(msg: str) -> None:
  print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def loadavg() -> list[float]:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return []


class PeakRSS:
  """Peak resident memory of one phase: VmHWM after resetting it (Linux clear_refs '5')."""

  def __init__(self):
    self.resettable = self._reset()

  @staticmethod
  def _reset() -> bool:
    try:
      with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
      return True
    except OSError:
      return False

  @staticmethod
  def _status(field: str) -> float | None:
    try:
      with open("/proc/self/status") as f:
        for line in f:
          if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0  # kB -> MiB
    except OSError:
      pass
    return None

  def start(self) -> None:
    if self.resettable:
      self._reset()

  def peak_mib(self) -> float | None:
    """Peak RSS since start() (or since process start if VmHWM cannot be reset)."""
    return self._status("VmHWM")

  @staticmethod
  def current_mib() -> float | None:
    return PeakRSS._status("VmRSS")


def ru_maxrss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


def stratified(groups: dict[int, list], total: int) -> dict[int, int]:
  """How many of each group's items to take so that `total` follows the groups' sizes (>= 1)."""
  sizes = {k: len(v) for k, v in groups.items() if v}
  n = sum(sizes.values())
  return {k: max(1, min(s, int(round(total * s / n)))) for k, s in sizes.items()}


def weighted_throughput(times: dict[int, list[float]], counts: dict[int, int],
                        units: dict[int, float], stat=np.median) -> tuple[float, float]:
  """(units/s, seconds) of a full pass with counts[b] batches taking stat(times[b]) each.

  The median per shape is the headline: the machine may be shared, and a step that lost its
  cores to another process should not count as the library's speed.
  """
  seconds = sum(counts[b] * float(stat(times[b])) for b in counts)
  return sum(units.values()) / seconds, seconds


def real_rows(idx: np.ndarray) -> int:
  return int((idx >= 0).sum())


class Timings:
  """Wall and process-CPU seconds of timed units, grouped by input length (tokens).

  cpu / wall tells how many cores the process really had: about --threads when the machine was
  free, less when other processes took cores (then wall times overstate the library's cost).
  """

  def __init__(self):
    self.wall: dict[int, list[float]] = collections.defaultdict(list)
    self.cpu: dict[int, list[float]] = collections.defaultdict(list)
    self.units = 0

  def time(self, length: int, fn) -> None:
    c0, t0 = time.process_time(), time.perf_counter()
    self.units += fn()
    self.wall[length].append(time.perf_counter() - t0)
    self.cpu[length].append(time.process_time() - c0)

  def summary(self, groups: dict[int, list] | None, unit: str) -> dict:
    """Throughput from the median time per shape, weighted by the batches of a full pass
    (`groups`; None: the timed units themselves), plus per-shape statistics."""
    wall_all = sum(sum(v) for v in self.wall.values())
    cpu_all = sum(sum(v) for v in self.cpu.values())
    out = {}
    if groups is not None:
      counts = {k: len(v) for k, v in groups.items()}
      units = {k: float(sum(real_rows(idx) for _, idx in v)) for k, v in groups.items()}
      missing = sorted(set(counts) - set(self.wall))
      if missing:
        raise ValueError(f"no timed batch of lengths {missing}")
      rate, seconds = weighted_throughput(self.wall, counts, units, np.median)
      rate_mean, _ = weighted_throughput(self.wall, counts, units, np.mean)
      rate_best, _ = weighted_throughput(self.wall, counts, units, np.min)
      out.update({
          f"{unit}_per_s": rate, "batches_per_s": sum(counts.values()) / seconds,
          f"{unit}_per_s_mean": rate_mean, f"{unit}_per_s_best": rate_best,
          "full_pass_s": seconds,
          "full_pass_batches": sum(counts.values()), f"full_pass_{unit}": int(sum(units.values())),
          "mean_input_tokens": float(sum(k * units[k] for k in units) / sum(units.values())),
          "batches_by_tokens": {int(k): counts[k] for k in sorted(counts)}})
    else:
      n = sum(len(v) for v in self.wall.values())
      flat = [x for v in self.wall.values() for x in v]
      median = float(np.median(flat))
      out.update({f"{unit}_per_s": self.units / n / median, "batches_per_s": 1.0 / median,
                  f"{unit}_per_s_mean": self.units / wall_all,
                  f"{unit}_per_s_best": self.units / n / float(np.min(flat))})
    out.update({
        "timed_units": self.units,
        "median_s_by_tokens": {int(k): float(np.median(v)) for k, v in sorted(self.wall.items())},
        "min_s_by_tokens": {int(k): float(np.min(v)) for k, v in sorted(self.wall.items())},
        "wall_s_all": {int(k): [round(x, 3) for x in v] for k, v in sorted(self.wall.items())},
        "cpu_per_wall": cpu_all / max(wall_all, 1e-9)})
    return out


@dataclasses.dataclass
class Phase:
  """Units of work of one measurement, each timed on its own.

  units: (input length, fn() -> number of samples / users done); warmup: fn run once before
  timing, under a fresh peak-RSS window; groups: batches of a full pass, for the weighting.
  """

  name: str
  unit: str
  units: list
  warmup: object = None
  groups: dict | None = None
  timings: Timings = dataclasses.field(default_factory=Timings)
  peak_rss_mib: float | None = None
  loadavg: list = dataclasses.field(default_factory=list)

  def summary(self) -> dict:
    res = self.timings.summary(self.groups, self.unit)
    res.update({"peak_rss_mib": self.peak_rss_mib, "loadavg_during": self.loadavg})
    if self.unit == "samples":
      res["steps_per_s"] = res.pop("batches_per_s")
    else:
      res.pop("batches_per_s")
    return res


def run_phases(phases: list[Phase], interleave: bool, peak: PeakRSS) -> None:
  """Warm-ups (one peak-RSS window each), then the timed units: round-robin over the phases
  when interleaving (so that every phase sees the same load on a shared machine), else each
  phase in turn."""
  for ph in phases:
    if ph.warmup is not None:
      peak.start()
      t0 = time.perf_counter()
      ph.warmup()
      ph.peak_rss_mib = peak.peak_mib()
      log(f"{ph.name}: warm-up {time.perf_counter() - t0:.1f}s, peak RSS {ph.peak_rss_mib} MiB")
  queues = [collections.deque(ph.units) for ph in phases]
  order = []
  if interleave:
    while any(queues):
      for ph, q in zip(phases, queues):
        if q:
          order.append((ph, q.popleft()))
  else:
    order = [(ph, u) for ph, q in zip(phases, queues) for u in q]
  for ph, (length, fn) in order:
    ph.loadavg.append(loadavg()[0] if loadavg() else None)
    ph.timings.time(length, fn)
  for ph in phases:
    log(f"{ph.name}: {ph.summary()[ph.unit + '_per_s']:.2f} {ph.unit}/s, cpu/wall "
        f"{ph.timings.summary(ph.groups, ph.unit)['cpu_per_wall']:.2f}, median s by tokens "
        f"{ph.timings.summary(ph.groups, ph.unit)['median_s_by_tokens']}")
