"""Tests of the continual-run report and of the transcribed DACT paper numbers."""

import os

import pytest

from genrec_jax.evaluation.paper_tables import DACT_LCREC, DACT_TIGER, METHOD_NAMES
from genrec_jax.evaluation.report import write_report

METRICS = ("recall@5", "recall@10", "recall@20", "ndcg@5", "ndcg@10", "ndcg@20")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics(base: float) -> dict:
  return {k: base + 0.001 * i for i, k in enumerate(METRICS)}


def _row(t: int, base: float, tokenizer_seconds: float, cold_users: int) -> dict:
  cold = {**_metrics(base / 2), "users": cold_users} if cold_users else {"users": 0}
  return {"period": t, "test": _metrics(base), "warm": {**_metrics(base), "users": 90},
          "cold": cold,
          "code_change": {"level_1": 0.1 * t, "level_2": 0.2, "level_3": 0.3, "overall": 0.4,
                          "identifier": 0.5, "items": 100},
          "seconds": tokenizer_seconds + 10.0, "tokenizer_seconds": tokenizer_seconds,
          "grm_seconds": 10.0, "cf_alignment": 0.25 + 0.01 * t,
          "identifiers": {"items": 100, "duplicates": 0, "max_dedup_digit": 1}}


def _method(tokenizer: str, base: float, tokenizer_seconds: float) -> dict:
  return {"rules": {"tokenizer": tokenizer, "identifiers": "keep", "recommender": "finetune"},
          "periods": [_row(t, base + 0.01 * t, tokenizer_seconds, 0 if t == 2 else 10)
                      for t in range(1, 5)]}


def _results(name: str) -> dict:
  periods = [{"period": t, "first_day": f"2014-0{t + 1}-01", "last_day": f"2014-0{t + 1}-28",
              "interactions": 1000 + t, "train": 700, "valid": 100, "test": 100,
              "catalog": 200 + 10 * t, "new_items": 10 * t,
              "new_item_test_fraction": float("nan") if t == 0 else 0.1}
             for t in range(5)]
  return {"dataset": {"name": name, "users": 321, "items": 210, "interactions": 5005},
          "periods": periods, "period_0": {"test": _metrics(0.05), "warm": {"users": 0},
                                           "cold": {**_metrics(0.05), "users": 100}},
          "methods": {"dact": _method("dact", 0.02, 5.0), "ft_grm": _method("frozen", 0.01, 0.0)}}


def test_report_has_tables_paper_rows_and_a_png(tmp_path):
  md_path, png_path = write_report(_results("toys"), str(tmp_path))
  assert md_path == os.path.join(str(tmp_path), "report.md")
  text = open(md_path).read()
  assert "321 users, 210 items, 5005 interactions" in text
  assert "| D3 | 2014-04-01 | 2014-04-28 | 1003 | 700 | 100 | 100 | 230 | 30 | 0.100 |" in text
  # Paper order (ft_grm before DACT); DACT P1 recall@5 = 0.02 + 0.01 = 0.0300.
  assert text.index("| Frozen tok + FT GRM | run |") < text.index("| DACT | run |")
  assert "| DACT | run | 0.0300 | 0.0310 | 0.0330 | 0.0340 |" in text
  assert "| DACT | paper | 0.0208 | 0.0353 | 0.0140 | 0.0186 |" in text
  assert "| naive fine-tuning | 0.7052 | 0.9696 | 0.9892 | 0.9999 |" in text
  # Code change: level_1 mean over periods = 0.1 * mean(1..4) = 0.25.
  assert "| DACT | 0.2500 | 0.2000 | 0.3000 | 0.4000 | 0.5000 |" in text
  assert "| DACT | P2 | 90 | 0.0410 | 0.0440 | 0 | - | - |" in text  # cold group empty
  assert "| DACT | P1 | 90 | 0.0310 | 0.0340 | 10 | 0.0160 | 0.0190 |" in text
  assert "| DACT | dact | 0.2600 | 0.2700 | 0.2800 | 0.2900 | 0.2750 |" in text
  assert "| DACT | 20.0 | 40.0 | 60.0 | 1.50 |" in text
  for method in ("frozen", "ft_tok", "ft_both", "ft_tok_rt_grm", "reformer"):
    assert f"| {METHOD_NAMES[method]} |" not in text.split("## Code change")[0]
  with open(png_path, "rb") as f:
    assert f.read(8) == PNG_MAGIC


def test_report_survives_missing_pieces(tmp_path):
  results = _results("unknown-dataset")
  results["methods"]["dact"]["periods"].pop()  # P4 not reached
  del results["methods"]["ft_grm"]
  md_path, png_path = write_report(results, str(tmp_path))
  text = open(md_path).read()
  assert "| paper |" not in text
  assert "| DACT | P4 | - | - | - | - | - | - |" in text
  assert "| DACT | 15.0 | 30.0 | 45.0 | - |" in text  # no ft_grm to compare with
  assert os.path.getsize(png_path) > 0


TABLE2 = "### DACT Table 2: TIGER (T5) backbone"
TABLE3 = "### DACT Table 3: LC-Rec (Qwen2.5-1.5B-Instruct + LoRA) backbone"


def _parse_table2(path: str, heading: str = TABLE2) -> dict:
  """{(dataset, method label): 16 cell strings} of the markdown's section under `heading`."""
  section = open(path).read().split(heading)[1]
  section = section.split("###")[0]
  rows = {}
  for line in section.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) == 18 and cells[0] not in ("dataset", "---"):
      rows[(cells[0].lower(), cells[1])] = cells[2:]
  return rows


@pytest.mark.parametrize("dataset,method,period,metric", [
    ("toys", "dact", 1, "ndcg@10"), ("toys", "frozen", 4, "ndcg@10"),
    ("beauty", "ft_tok_rt_grm", 3, "recall@10"), ("beauty", "reformer", 2, "ndcg@5"),
    ("tools", "dact", 1, "ndcg@5"), ("tools", "ft_tok", 4, "recall@5"),
])
def test_paper_cells_match_the_markdown(shared_dir, dataset, method, period, metric):
  path = os.path.join(shared_dir, "reference", "PAPER_TABLES.md")
  if not os.path.exists(path):
    pytest.skip(f"{path} not found")
  rows = _parse_table2(path)
  column = 4 * (period - 1) + ("recall@5", "recall@10", "ndcg@5", "ndcg@10").index(metric)
  assert DACT_TIGER[dataset][method][period][metric] == float(
      rows[(dataset, METHOD_NAMES[method])][column])


@pytest.mark.parametrize("heading,table,count", [(TABLE2, DACT_TIGER, 21),
                                                 (TABLE3, DACT_LCREC, 16)])
def test_every_paper_cell_matches_the_markdown(shared_dir, heading, table, count):
  path = os.path.join(shared_dir, "reference", "PAPER_TABLES.md")
  if not os.path.exists(path):
    pytest.skip(f"{path} not found")
  rows = _parse_table2(path, heading)
  assert len(rows) == count
  for (dataset, label), cells in rows.items():
    method = next(k for k, v in METHOD_NAMES.items() if v == label)
    ours = [table[dataset][method][t][k] for t in range(1, 5)
            for k in ("recall@5", "recall@10", "ndcg@5", "ndcg@10")]
    assert ours == [float(c) for c in cells], (dataset, label)
