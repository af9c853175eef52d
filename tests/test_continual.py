"""The continual pipeline end to end on a tiny synthetic dataset with late (cold) items."""

import csv
import json

import pytest

from genrec_jax.pipelines import continual
from genrec_jax.training import loop
from tests.conftest import tiny_config

METHODS = ("frozen", "ft_tok", "ft_grm", "ft_both", "ft_tok_rt_grm", "reformer", "dact")


def _identifiers(path):
  with open(path) as f:
    return {row["item"]: tuple(int(v) for k, v in row.items() if k != "item")
            for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  directory = tmp_path_factory.mktemp("continual")
  config = tiny_config(str(directory), method="continual", late_items=8)
  results = continual.run(config, str(directory / "run"))
  return directory / "run", results


def test_every_method_has_every_period(run):
  workdir, results = run
  on_disk = json.loads((workdir / "results.json").read_text())
  assert [p["period"] for p in on_disk["periods"]] == [0, 1, 2, 3, 4]
  assert set(on_disk["methods"]) == set(METHODS)
  for name in METHODS:
    rows = on_disk["methods"][name]["periods"]
    assert [r["period"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
      assert set(r["test"]) >= {"recall@5", "recall@10", "ndcg@5", "ndcg@10"}
      assert set(r["code_change"]) >= {"level_1", "overall"}
      assert r["identifiers"]["duplicates"] == 0
  assert sum(r["new_items"] for r in on_disk["periods"][1:]) == 8
  assert set(on_disk["analyses"]["relative_time"]) == set(METHODS)


def test_identifier_tables_are_unique_and_follow_their_rules(run):
  workdir, results = run
  for name in METHODS:
    tables = [_identifiers(workdir / name / f"period_{t}" / "identifiers.csv")
              for t in range(5)]
    for t, table in enumerate(tables):
      assert len(set(table.values())) == len(table), (name, t)
      assert len(table) == results["periods"][t]["catalog"]
    for before, after in zip(tables, tables[1:]):
      assert set(before) <= set(after)
      old = list(before)
      if name in ("frozen", "ft_grm", "reformer"):  # old identifiers never move
        assert all(before[i] == after[i] for i in old)
      if name == "dact":  # an item keeps its whole identifier unless its level-1 code moved
        assert all(before[i] == after[i] for i in old if before[i][0] == after[i][0])


def test_frozen_recommender_rows_share_the_pretrained_model(run):
  _, results = run
  frozen = results["methods"]["frozen"]["periods"]
  ft_grm = results["methods"]["ft_grm"]["periods"]
  assert all(r["grm_seconds"] == 0.0 for r in frozen)
  assert all(r["grm_seconds"] > 0.0 for r in ft_grm)


def test_continual_run_resumes_inside_a_period(tmp_path, monkeypatch):
  config = tiny_config(str(tmp_path), method="continual", late_items=8)
  config.continual.methods = ("ft_both", "dact")
  config.continual.fractions = (0.6, 0.8)  # three periods keep the test short
  reference = continual.run(config, str(tmp_path / "straight"))

  real_fit, grm_calls = loop.fit, []

  def crashing_fit(**kwargs):
    if kwargs["name"] == "grm":
      grm_calls.append(1)
      if len(grm_calls) == 4:  # period 0, ft_both P1..P2, then inside dact P1
        kwargs["interrupt_after_epoch"] = 0
    return real_fit(**kwargs)

  monkeypatch.setattr(loop, "fit", crashing_fit)
  with pytest.raises(KeyboardInterrupt):
    continual.run(config, str(tmp_path / "resumed"))
  monkeypatch.setattr(loop, "fit", real_fit)
  resumed = continual.run(config, str(tmp_path / "resumed"))
  for name in config.continual.methods:
    for a, b in zip(resumed["methods"][name]["periods"], reference["methods"][name]["periods"]):
      assert a["test"] == b["test"] and a["code_change"] == b["code_change"]
