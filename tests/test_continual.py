"""The continual pipeline end to end on a tiny synthetic dataset with late (cold) items."""

import csv
import json
import shutil

import numpy as np
import pytest

from genrec_jax.methods import dact as continual
from genrec_jax.training import loop
from tests.conftest import interrupt_then_resume, tiny_config

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

  # the 4th recommender fit (period 0, ft_both P1..P2, then inside dact P1) stops after epoch 0
  resumed = interrupt_then_resume(
      monkeypatch, lambda: continual.run(config, str(tmp_path / "resumed")), "grm", epoch=0,
      call=4)
  for name in config.continual.methods:
    for a, b in zip(resumed["methods"][name]["periods"], reference["methods"][name]["periods"]):
      assert a["test"] == b["test"] and a["code_change"] == b["code_change"]


def test_a_new_period_extends_a_finished_run(tmp_path):
  """Data arrives after the run: the stored periods are reused, one more period is computed."""
  config = tiny_config(str(tmp_path), method="continual", late_items=8)
  config.continual.methods = ("ft_both", "dact")
  config.continual.fractions = (0.6, 0.8)
  rows = list(csv.reader(open(config.data.path)))
  header, rows = rows[0], rows[1:]
  cut = sorted(int(r[2]) for r in rows)[int(len(rows) * 0.85)] // 86400 * 86400
  # After the cut, the late items (i048..) come back under new ids: items nobody saw before.
  rows = [[u, "n" + i[1:] if int(t) >= cut and int(i[1:]) >= 48 else i, t] for u, i, t in rows]
  old_path, new_path = str(tmp_path / "old.csv"), str(tmp_path / "new.csv")
  for path, part in ((old_path, [r for r in rows if int(r[2]) < cut]),
                     (new_path, [r for r in rows if int(r[2]) >= cut])):
    with open(path, "w", newline="") as f:
      csv.writer(f).writerows([header] + part)
  config.data.path = old_path
  # Item vectors: one row per item in sorted raw-id order; the user extends the file when the
  # new period brings new items.
  from genrec_jax.data import load_interactions
  known = sorted(load_interactions(old_path).item_ids.tolist())
  every = sorted(set(known) | {r[1] for r in rows if int(r[2]) >= cut})
  vectors = np.load(config.embeddings.file)
  config.embeddings.file = str(tmp_path / "vectors.npy")
  np.save(config.embeddings.file, vectors[[int(i[1:]) for i in known]])

  workdir = tmp_path / "run"
  first = continual.run(config, str(workdir))
  before = {(m, t): (workdir / m / f"period_{t}" / "identifiers.csv").read_text()
            for m in config.continual.methods for t in range(3)}

  steps = {}  # checkpoint dir -> train steps taken in the second run
  real_fit = loop.fit

  def counting_fit(**kwargs):
    directory, step = kwargs["checkpoint_dir"], kwargs["train_step"]
    steps[directory] = 0

    def counted(*args):
      steps[directory] += 1
      return step(*args)
    return real_fit(**{**kwargs, "train_step": counted})

  config.continual.new_periods = (new_path,)
  np.save(config.embeddings.file, vectors[[int(i[1:]) for i in every]])
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(loop, "fit", counting_fit)
    second = continual.run(config, str(workdir))

  assert [p["period"] for p in second["periods"]] == [0, 1, 2, 3]
  assert second["periods"][:3] == first["periods"]
  new_items = second["periods"][3]["new_items"]
  assert new_items > 0 and second["dataset"]["items"] == first["dataset"]["items"] + new_items
  for name in config.continual.methods:
    old_rows, rows_now = first["methods"][name]["periods"], second["methods"][name]["periods"]
    assert rows_now[:2] == old_rows  # stored results, not re-evaluated
    assert rows_now[2]["period"] == 3 and rows_now[2]["identifiers"]["duplicates"] == 0
    for t in range(3):  # stored identifier tables (and so item indices) did not move
      assert (workdir / name / f"period_{t}" / "identifiers.csv").read_text() == before[name, t]
    table = _identifiers(workdir / name / "period_3" / "identifiers.csv")
    previous = _identifiers(workdir / name / "period_2" / "identifiers.csv")
    assert len(table) == len(previous) + new_items and set(previous) < set(table)
    assert len(set(table.values())) == len(table)
  # Only the new period trained anything (CF model and recommenders); the rest was restored.
  assert steps and all((n > 0) == ("period_3" in d) for d, n in steps.items()), steps
  assert sum("period_3" in d for d in steps) == 1 + len(config.continual.methods)
  with pytest.raises(ValueError, match="another config"):
    config.tokenizer.train_length += 1
    continual.run(config, str(workdir))


def test_a_new_period_must_start_after_the_data(tmp_path):
  from genrec_jax.data import DataError, append_interactions, load_interactions
  from genrec_jax.data.interactions import RawInteractions
  config = tiny_config(str(tmp_path))
  inter = load_interactions(config.data.path)
  last = int(inter.timestamp.max())
  late = RawInteractions(np.array(["u0001", "new_user"]), np.array(["i001", "new_item"]),
                         np.array([last + 86400, last], np.int64), "new.csv")
  with pytest.raises(DataError, match=r"new.csv: 1 interaction\(s\) fall on or before .*row 2"):
    append_interactions(inter, late)
  ok = append_interactions(inter, late.take(np.array([0])))
  assert ok.num_items == inter.num_items and ok.num_users == inter.num_users
  both = append_interactions(inter, RawInteractions(
      np.array(["new_user", "u0001"]), np.array(["new_item", "i001"]),
      np.array([last + 86400] * 2, np.int64), "new.csv"))
  assert both.item_ids[:-1].tolist() == inter.item_ids.tolist()
  assert both.item_ids[-1] == "new_item" and both.user_ids[-1] == "new_user"
  assert both.num_interactions == inter.num_interactions + 2


def test_data_without_item_text_runs_on_cf_embeddings(tmp_path):
  """embeddings.source='cf' (no item text, TIGER-SAS): the period-0 CF embeddings are the
  tokenizer input, and an item new in period t takes its period-t CF embedding."""
  from genrec_jax.config import check_config
  config = tiny_config(str(tmp_path), method="continual", late_items=8)
  config.embeddings.update(source="cf", file="")
  config.data.items_csv = ""
  config.continual.methods = ("reformer", "dact")
  config.continual.fractions = (0.6, 0.8)
  check_config(config)
  run = continual.ContinualRun(config, str(tmp_path / "run"))
  results = run.run()
  np.testing.assert_array_equal(run.features[run.periods[0].catalog],
                                run.cf[0][run.periods[0].catalog])
  late = [t for t in (1, 2) if len(run.periods[t].new_items)]
  assert late
  for t in late:
    new = run.periods[t].new_items
    np.testing.assert_array_equal(run.features[new], run.cf[t][new])
    assert not np.allclose(run.cf[0][new], run.cf[t][new])  # period-0 rows: untrained init
  for name in ("reformer", "dact"):
    assert [r["period"] for r in results["methods"][name]["periods"]] == [1, 2]


LCREC_METHODS = ("frozen", "ft_tok", "ft_grm", "ft_both", "reformer", "dact", "lsat", "peso")


def _lcrec_config(directory):
  config = tiny_config(str(directory), method="continual", late_items=8)
  config.grm.update(backbone="lcrec", checkpoint="random", epochs=4)
  config.grm.lcrec.update(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
                          num_heads=2, num_kv_heads=1, rope_theta=10000.0,
                          train_backbone_from_init=True)
  config.continual.methods = LCREC_METHODS
  return config


def test_lcrec_backbone_runs_every_method_of_table_3(tmp_path):
  """DACT Table 3's rows on the LC-Rec backbone (a tiny random Qwen2): every method reaches
  every period and the report; the frozen row trains nothing; PESO's objective carries its
  proximal term (its value is tiny here: adapters barely move from the previous period's, and
  the KL of softmaxes over whole flattened matrices is small);
  LSAT's short-term adapter trains beside its long-term one; the report cites Table 3."""
  config = _lcrec_config(tmp_path)
  results = continual.run(config, str(tmp_path / "run"))
  assert tuple(results["methods"]) == LCREC_METHODS
  for name in LCREC_METHODS:
    rows = results["methods"][name]["periods"]
    assert [r["period"] for r in rows] == [1, 2, 3, 4]
    assert all(0 <= r["test"]["ndcg@10"] <= 1 for r in rows)
  assert all(r["grm_seconds"] == 0.0 for r in results["methods"]["frozen"]["periods"])
  assert all(r["grm_seconds"] > 0.0 for r in results["methods"]["peso"]["periods"])
  # PESO's proximal term reaches its objective (reported beside the loss) and ft_grm's not.
  import orbax.checkpoint as ocp
  from genrec_jax.training.checkpoint import Checkpoints
  for name, has_term in (("peso", True), ("ft_grm", False)):
    stored = Checkpoints(str(tmp_path / "run" / "checkpoints" / name / "period_2" / "grm"), ())
    meta = stored.manager.restore(stored.latest_step(), args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]
    stored.close()
    assert all(("proximal" in h) == has_term for h in meta["history"]), name
  assert (tmp_path / "run" / "checkpoints" / "lsat_short" / "period_4" / "grm").is_dir()
  report = (tmp_path / "run" / "report.md").read_text()
  assert "| LSAT | run |" in report and "| PESO | run |" in report
  assert "DACT Table 3 layout" in report and "no LC-Rec backbone, Table 3 numbers" in report
  # LSAT with score averaging: every stage restored, only the rankings computed anew.
  # (A copy of the run without its stored config and LSAT's result rows.)
  shutil.copytree(tmp_path / "run", tmp_path / "scores",
                  ignore=lambda d, names: [n for n in names if n in ("lsat", "config.json")
                                           and d == str(tmp_path / "run")])
  config.continual.lsat.combine = "scores"
  config.continual.methods = ("lsat",)
  rerun = continual.run(config, str(tmp_path / "scores"))
  merged = [r["test"] for r in results["methods"]["lsat"]["periods"]]
  mixed = [r["test"] for r in rerun["methods"]["lsat"]["periods"]]
  assert len(mixed) == 4 and mixed != merged


def test_lcrec_config_errors(tmp_path):
  from genrec_jax.config import ConfigError, check_config
  config = _lcrec_config(tmp_path)
  config.grm.checkpoint = str(tmp_path / "missing")
  with pytest.raises(ConfigError, match="grm.checkpoint=.*not a checkpoint directory"):
    check_config(config)
  config = _lcrec_config(tmp_path)
  config.continual.methods = ("dact", "pit")
  with pytest.raises(ConfigError, match="'pit' runs on the T5 backbone"):
    check_config(config)
  config.grm.backbone = "t5"
  config.continual.methods = ("peso",)
  with pytest.raises(ConfigError, match="LoRA baselines of the LC-Rec backbone"):
    check_config(config)
