"""Serving a finished run (issue 15): `Recommender.load` reproduces the run's test metrics from
raw item ids, the exported ranking equals the in-process one, bad input fails clearly."""

import numpy as np
import pytest

from genrec_jax import Recommender, methods
from genrec_jax.data import leave_one_out, load_interactions
from genrec_jax.evaluation.metrics import metrics_from_ranks, target_ranks
from genrec_jax.serving import load_exported
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def served_run(tmp_path_factory):
  directory = tmp_path_factory.mktemp("serving")
  config = tiny_config(str(directory))
  config.grm.update(epochs=4, eval_every=2)
  workdir = str(directory / "run")
  results = methods.run(config, workdir)
  return config, workdir, results


def test_recommend_reproduces_the_runs_test_metrics_from_raw_item_ids(served_run):
  config, workdir, results = served_run
  rec = Recommender.load(workdir)
  inter = load_interactions(config.data.path, min_count=config.data.min_count)
  test = leave_one_out(inter, config.data.max_history).test
  histories = [[inter.item_ids[i] for i in row if i >= 0] for row in test.history]
  items, scores = rec.recommend(histories, k=config.grm.beam_size)
  index = {raw: i for i, raw in enumerate(inter.item_ids)}
  ranked = np.full((len(items), config.grm.beam_size), -1)
  for row, got in enumerate(items):
    assert len(set(got)) == len(got)  # each item once
    ranked[row, :len(got)] = [index[raw] for raw in got]
  assert (np.diff(scores, axis=1)[np.isfinite(scores[:, 1:])] <= 1e-6).all()
  metrics = metrics_from_ranks(target_ranks(ranked, test.target))
  for name, value in results["metrics"]["test"].items():
    assert metrics[name] == pytest.approx(value, abs=1e-9)


def test_exported_ranking_equals_the_in_process_one(served_run):
  _, workdir, _ = served_run
  rec = Recommender.load(workdir)
  raw = [list(rec.item_ids[[0, 3, 5]]), list(rec.item_ids[[7]]), list(rec.item_ids[[2, 2, 9]])]
  items, scores = rec.recommend(raw, k=5)
  ranking = load_exported(rec.export(batch_size=3, k=5))
  got_items, got_scores = ranking(rec.histories(raw))
  assert rec._raw(np.asarray(got_items)) == items
  finite = np.isfinite(scores)
  np.testing.assert_allclose(np.asarray(got_scores)[finite], scores[finite], rtol=1e-5)


def test_unknown_items_and_empty_histories_fail_with_a_clear_message(served_run):
  _, workdir, _ = served_run
  rec = Recommender.load(workdir)
  with pytest.raises(ValueError, match=r"unknown item ids \['nope'\]"):
    rec.recommend([[rec.item_ids[0], "nope"]])
  with pytest.raises(ValueError, match="history 0 is empty"):
    rec.recommend([[]])
  with pytest.raises(FileNotFoundError, match="config.json"):
    Recommender.load(workdir + "_missing")
