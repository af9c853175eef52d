"""Human-readable report of a continual (DACT) run: WORKDIR/report.md and an N@10 plot.

Everything is derived from the per-period rows of results.json (not from its "analyses"), so a
report can also be written from a partial results.json while methods are still running. Missing
pieces (a method not run, a period not reached, a cold group without users) render as "-".
Where the dataset is one of the DACT paper's, its numbers for the run's backbone sit beside ours.
"""

from __future__ import annotations

import math
import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from genrec_jax.evaluation.paper_tables import (DACT_LCREC, DACT_TABLE4_TOOLS, DACT_TIGER,
                                                METHOD_NAMES)

PAPER_METRICS = (("recall@5", "H@5"), ("recall@10", "H@10"), ("ndcg@5", "N@5"),
                 ("ndcg@10", "N@10"))
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")

HOW_TO_READ = """\
## How to read this

All metrics are fractions (0.0531 = 5.31 %), ranking the full catalog with one relevant item
per test user. H@K is Hit@K, which equals Recall@K with one relevant item; N@K is NDCG@K.
Periods P1..P4 follow the pre-training period D0; each method is evaluated on period t's test
targets with its own identifier table of period t. "paper" rows are the DACT paper's rows of
the same backbone (Table 2: TIGER, Table 3: LC-Rec) on the same dataset, for comparison only.
"-" marks a value that was not produced (method not run, period not reached, or a group
without users); a mean over periods is shown only when every period has a value."""


def write_report(results: dict, out_dir: str) -> tuple[str, str]:
  """Writes out_dir/report.md and out_dir/ndcg10_per_period.png; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  methods = _ordered_methods(results.get("methods", {}))
  periods = _periods(results, methods)
  name = str(results.get("dataset", {}).get("name", "?"))
  backbone = results.get("config", {}).get("grm", {}).get("backbone", "t5")
  paper = (DACT_LCREC if backbone == "lcrec" else DACT_TIGER).get(name.lower())
  sections = [
      _header(results, name),
      HOW_TO_READ,
      _period_table(results.get("periods", [])),
      _metric_table(methods, periods, paper, name, backbone),
      _code_change_table(methods),
      _warm_cold_table(methods, periods),
      _alignment_table(methods, periods),
      _time_table(methods),
  ]
  md_path = os.path.join(out_dir, "report.md")
  with open(md_path, "w") as f:
    f.write("\n\n".join(sections) + "\n")
  png_path = os.path.join(out_dir, "ndcg10_per_period.png")
  _plot_ndcg10(methods, periods, name, png_path)
  return md_path, png_path


# ------------------------------------------------------------------------------- helpers
def _fmt(value, digits: int = 4) -> str:
  """A number with fixed decimals, "-" for a missing or NaN value."""
  if value is None:
    return "-"
  value = float(value)
  return "-" if math.isnan(value) else f"{value:.{digits}f}"


def _paper_cell(value) -> str:
  """A paper number as printed: 4 decimals unless the paper printed more (0.01453)."""
  if isinstance(value, tuple):  # a (low, high) range, printed with 3 decimals
    return " - ".join(f"{v:g}" for v in value)
  return _fmt(value) if round(value, 4) == value else repr(value)


def _mean(values) -> float | None:
  """Mean over periods, None unless every period has a value (means stay comparable)."""
  values = [None if v is None else float(v) for v in values]
  if not values or any(v is None or math.isnan(v) for v in values):
    return None
  return sum(values) / len(values)


def _table(header: list[str], rows: list[list[str]]) -> str:
  """A GitHub-flavoured markdown table."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


def _ordered_methods(methods: dict) -> dict:
  """The run's methods in the paper's row order, unknown methods last."""
  order = [m for m in METHOD_NAMES if m in methods] + [m for m in methods
                                                      if m not in METHOD_NAMES]
  return {m: methods[m] for m in order}


def _label(method: str) -> str:
  """The paper's row name of a method key (the key itself for a method the paper lacks)."""
  return METHOD_NAMES.get(method, method)


def _periods(results: dict, methods: dict) -> list[int]:
  """Evaluated periods (1..): those of the period summary and of every method's rows."""
  found = {p["period"] for p in results.get("periods", []) if p["period"] > 0}
  for m in methods.values():
    found.update(r["period"] for r in m.get("periods", []))
  return sorted(found)


def _row(method: dict, period: int) -> dict:
  """The method's row of `period`, {} if it was not reached."""
  return next((r for r in method.get("periods", []) if r["period"] == period), {})


# ------------------------------------------------------------------------------ sections
def _header(results: dict, name: str) -> str:
  stats = results.get("dataset", {})
  lines = [f"# Continual run report: {name}", "",
           f"Dataset `{name}`: {stats.get('users', '-')} users, {stats.get('items', '-')} items, "
           f"{stats.get('interactions', '-')} interactions."]
  test0 = results.get("period_0", {}).get("test")
  if test0:
    lines.append("Period 0 (pre-training) test: " + ", ".join(
        f"{short} {_fmt(test0.get(key))}" for key, short in PAPER_METRICS) + ".")
  return "\n".join(lines)


def _period_table(periods: list[dict]) -> str:
  header = ["period", "first day", "last day", "interactions", "train", "valid", "test",
            "catalog", "new items", "new-item test share"]
  rows = [[f"D{p['period']}", p.get("first_day", "-"), p.get("last_day", "-"),
           *(str(p.get(k, "-")) for k in ("interactions", "train", "valid", "test", "catalog",
                                           "new_items")),
           _fmt(p.get("new_item_test_fraction"), 3)] for p in periods]
  return "## Periods\n\n" + _table(header, rows)


def _metric_table(methods: dict, periods: list[int], paper: dict | None, name: str,
                  backbone: str) -> str:
  """Paper-style Table 2 / 3: H@5/H@10/N@5/N@10 per period, our row then the paper's."""
  header = ["method", "source"] + [f"P{t} {short}" for t in periods
                                   for _, short in PAPER_METRICS] + ["mean N@10"]
  rows = []
  for method, m in methods.items():
    tests = [_row(m, t).get("test", {}) for t in periods]
    rows.append([_label(method), "run"]
                + [_fmt(test.get(key)) for test in tests for key, _ in PAPER_METRICS]
                + [_fmt(_mean(test.get("ndcg@10") for test in tests))])
    if paper and method in paper:
      cells = [paper[method].get(t, {}) for t in periods]
      rows.append([_label(method), "paper"]
                  + [_paper_cell(c[key]) if key in c else "-" for c in cells
                     for key, _ in PAPER_METRICS]
                  + [_fmt(_mean(c.get("ndcg@10") for c in cells))])
  table = "Table 3" if backbone == "lcrec" else "Table 2"
  source = f"{'LC-Rec' if backbone == 'lcrec' else 'TIGER'} backbone, {table}"
  note = (f"DACT paper rows: {source}, dataset `{name.lower()}`." if paper
          else f"The DACT paper reports no {source} numbers for `{name}`.")
  return (f"## Test metrics per period (DACT {table} layout)\n\n" + _table(header, rows)
          + "\n\n" + note)


def _code_change_table(methods: dict) -> str:
  """DACT Table 4: share of old items whose code changed, per level, averaged over periods."""
  keys = sorted({k for m in methods.values() for r in m.get("periods", [])
                 for k in r.get("code_change", {}) if k.startswith("level_")},
                key=lambda k: int(k.split("_")[1])) + ["overall", "identifier"]
  header = ["method"] + [k.replace("_", " ") for k in keys]
  rows = [[_label(method)] + [_fmt(_mean(r.get("code_change", {}).get(k)
                                         for r in m.get("periods", []))) for k in keys]
          for method, m in methods.items()]
  paper_keys = ("level_1", "level_2", "level_3", "overall")
  paper_rows = [[label] + [_paper_cell(cells[k]) for k in paper_keys]
                for label, cells in DACT_TABLE4_TOOLS.items()]
  return ("## Code change rates (DACT Table 4 layout)\n\n"
          "Share of the items present in consecutive periods whose code changed at each "
          "level; \"overall\" = any code level changed (dedup digit excluded), \"identifier\" = "
          "the full identifier changed. Averaged over periods.\n\n" + _table(header, rows)
          + "\n\nPaper, Table 4 (Tools, TIGER), for reference:\n\n"
          + _table(["paper row", "level 1", "level 2", "level 3", "overall"], paper_rows))


def _warm_cold_table(methods: dict, periods: list[int]) -> str:
  """Test users split by target: warm (item known before the period) vs cold (new item)."""
  header = ["method", "period", "warm users", "warm R@10", "warm N@10", "cold users",
            "cold R@10", "cold N@10"]
  rows = []
  for method, m in methods.items():
    for t in periods:
      row = _row(m, t)
      cells = []
      for group in ("warm", "cold"):
        g = row.get(group, {})
        cells += [str(g.get("users", "-")), _fmt(g.get("recall@10")), _fmt(g.get("ndcg@10"))]
      rows.append([_label(method), f"P{t}"] + cells)
  return "## Warm vs cold test targets\n\n" + _table(header, rows)


def _alignment_table(methods: dict, periods: list[int]) -> str:
  """Mean cosine between quantized latents and the current CF embeddings, per period."""
  header = ["method", "tokenizer"] + [f"P{t}" for t in periods] + ["mean"]
  rows = []
  for method, m in methods.items():
    values = [_row(m, t).get("cf_alignment") for t in periods]
    rows.append([_label(method), m.get("rules", {}).get("tokenizer", "-")]
                + [_fmt(v) for v in values] + [_fmt(_mean(values))])
  return ("## CF alignment\n\nMean cosine between each item's quantized latent and its "
          "period-t CF (SASRec) embedding: how well a frozen tokenizer vs an updated one "
          "tracks the drifting collaborative signal.\n\n" + _table(header, rows))


def _time_table(methods: dict) -> str:
  """Tokenizer + recommender training seconds summed over periods, relative to ft_grm."""
  totals = {method: sum(r.get("seconds", 0.0) for r in m.get("periods", []))
            for method, m in methods.items()}
  base = totals.get("ft_grm")
  rows = [[_label(method),
           _fmt(sum(r.get("tokenizer_seconds", 0.0) for r in m.get("periods", [])), 1),
           _fmt(sum(r.get("grm_seconds", 0.0) for r in m.get("periods", [])), 1),
           _fmt(totals[method], 1),
           _fmt(totals[method] / base, 2) if base else "-"]
          for method, m in methods.items()]
  return ("## Training time\n\nSeconds summed over periods P1..; relative = total / total of "
          "\"Frozen tok + FT GRM\" (ft_grm).\n\n"
          + _table(["method", "tokenizer s", "GRM s", "total s", "relative to ft_grm"], rows))


def _plot_ndcg10(methods: dict, periods: list[int], name: str, path: str) -> None:
  """N@10 per period, one line per method (gaps where a period is missing)."""
  fig = Figure(figsize=(7.5, 4.5))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for i, (method, m) in enumerate(methods.items()):
    values = [_row(m, t).get("test", {}).get("ndcg@10", float("nan")) for t in periods]
    ax.plot(periods, values, marker=MARKERS[i % len(MARKERS)], label=_label(method))
  ax.set_xticks(periods, [f"P{t}" for t in periods])
  ax.set_xlabel("period")
  ax.set_ylabel("NDCG@10")
  ax.set_title(f"NDCG@10 per period: {name}")
  ax.grid(alpha=0.3)
  if methods:
    ax.legend(fontsize=8, loc="best")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
