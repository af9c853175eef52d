"""PIT (genrec_jax.methods.pit): selection, alignment, index, generator warm start, run."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from genrec_jax import methods
from genrec_jax.config import ConfigError, check_config
from genrec_jax.methods import pit
from genrec_jax.recommenders.t5 import T5, T5Config
from genrec_jax.data.splits import subsample
from genrec_jax.tokenizers.identifiers import IdentifierTable, assign_dedup
from tests.conftest import interrupt_then_resume, tiny_config

forward = nnx.jit(lambda model, *args: model(*args))  # compiled: eager calls take seconds each


def test_min_loss_selection_picks_the_argmin_among_the_targets_identifiers():
  nll = jnp.array([[2.0, 1.0, 3.0], [0.5, 0.1, 9.0], [4.0, 4.5, 0.0], [7.0, 0.2, 0.3]])
  count = jnp.array([3, 1, 2, 3])  # row 1 owns one identifier: slot 1's 0.1 is padding
  np.testing.assert_array_equal(pit.select_identifiers(nll, count), [1, 0, 0, 1])
  picks = np.stack([pit.select_identifiers(nll, count, "random", jax.random.key(s))
                    for s in range(200)])
  assert (picks < np.asarray(count)[None]).all()
  assert set(picks[:, 0]) == {0, 1, 2} and set(picks[:, 1]) == {0}
  with pytest.raises(ValueError, match="pit.selection"):
    pit.select_identifiers(nll, count, "best")


def _tiny_model(num_items=6, m=3, levels=2, k=4, d_in=5, dim=8):
  rngs = nnx.Rngs(0)
  owners = np.array([0, 0, 1, 2, 2, 2, 3, 4, 5], np.int32)
  codes = np.array([[0, 1, 0], [2, 3, 0], [0, 1, 1], [1, 1, 0], [3, 0, 0], [2, 2, 0],
                    [1, 2, 0], [0, 0, 0], [3, 3, 0]], np.int32)
  table = IdentifierTable(codes, owners, (k,) * levels + (2,))
  token_sets, count = table.item_token_sets(num_items, width=m)
  gen_cfg = T5Config(vocab_size=0, d_model=8, d_ff=16, num_heads=2, d_kv=4,
                     num_encoder_layers=1, num_decoder_layers=0, dropout_rate=0.0)
  t5 = T5(T5Config(vocab_size=table.vocab_size, d_model=8, d_ff=16, num_heads=2, d_kv=4,
                   num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.0), rngs=rngs)
  model = pit.PIT(pit.ItemEmbeddings(num_items, d_in, dim, rngs=rngs),
                  pit.ItemToToken(dim, levels, k, gen_cfg, rngs=rngs), t5,
                  pit.Index(token_sets, count))
  model.embeddings.free[...] = jax.random.normal(jax.random.key(3), (num_items, dim))
  features = jax.random.normal(jax.random.key(1), (num_items, d_in))
  return model, table, features


def _batch():
  return {"history": jnp.array([[1, 3, -1], [-1, 4, 5], [0, 2, 1], [5, -1, -1]]),
          "target": jnp.array([2, 0, 2, -1]), "weight": jnp.array([1.0, 1.0, 1.0, 0.0])}


def test_recommender_term_is_each_examples_lowest_identifier_loss():
  model, table, features = _tiny_model()
  cfg = pit.LossConfig(code_offsets=tuple(int(o) for o in table.offsets[:-1]))
  batch = _batch()
  (_, parts), usage = nnx.jit(lambda m, b, c: (pit.pit_loss(m, b, None, c, cfg),
                                                m.index.usage[...]))(
      model, batch, {"features": features})
  tokens = table.tokens()
  primary = table.item_tokens(6)
  want, alternative, chosen = [], [], []
  for history, target in zip(np.asarray(batch["history"])[:3], np.asarray(batch["target"])[:3]):
    inputs = np.concatenate([primary[h] if h >= 0 else np.zeros(3, np.int32) for h in history])
    losses = []
    for row in tokens[table.item == target]:  # brute force: every identifier of the target
      logits = forward(model.recommender, jnp.asarray(inputs)[None], jnp.asarray(
          np.concatenate([[0], row[:-1]]))[None])[0]
      logp = np.asarray(jax.nn.log_softmax(logits, -1))
      losses.append(-np.mean(logp[np.arange(3), row]))
    want.append(min(losses))
    alternative.append(float(np.argmin(losses) > 0))
    chosen.append(int(np.argmin(losses)))
  assert float(parts["rec"]) == pytest.approx(np.mean(want), rel=1e-5)
  assert float(parts["alternative_selected"]) == pytest.approx(np.mean(alternative))
  counts = np.zeros((6, 3))  # the step counts each real example's selection, fillers none
  for target, slot in zip(np.asarray(batch["target"])[:3], chosen):
    counts[target, slot] += 1
  np.testing.assert_array_equal(np.asarray(usage), counts)


def test_generator_beams_are_the_best_sequences_by_brute_force():
  model, _, features = _tiny_model()
  e = jax.random.normal(jax.random.key(5), (3, 8))
  codes, scores = nnx.jit(lambda g, e: g.generate(e, 16), )(model.generator, e)
  every = jnp.asarray(list(itertools.product(range(4), repeat=2)))  # all K^L = 16 sequences
  for row in range(3):
    logp = nnx.jit(lambda g, e, c: g.code_log_probs(e, c).sum(-1))(
        model.generator, jnp.repeat(e[row][None], 16, 0), every)
    order = np.argsort(-np.asarray(logp), kind="stable")
    np.testing.assert_allclose(np.asarray(scores[row]), np.asarray(logp)[order], rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(codes[row]), np.asarray(every)[order])


def test_alignment_equals_a_numpy_transcription():
  model, _, features = _tiny_model()
  emb = model.embeddings
  batch = _batch()
  got = nnx.jit(pit.alignment_loss)(emb, batch["history"], batch["target"], batch["weight"],
                                    features)
  w = lambda layer: np.asarray(layer.kernel[...])
  e = (np.asarray(features) @ w(emb.text) + np.asarray(emb.text.bias[...])
       + np.asarray(emb.free[...]))
  history, target = np.asarray(batch["history"]), np.asarray(batch["target"])
  weight = np.asarray(batch["weight"])
  nll = []
  for b in range(4):
    if weight[b] == 0:
      continue
    hist = e[history[b][history[b] >= 0]]
    scores = {}
    for c in range(4):
      if weight[c] == 0 or (c != b and target[c] == target[b]):
        continue  # fillers and other rows of the same item are no negatives
      cand = e[target[c]]
      att = (cand @ w(emb.query)) @ (hist @ w(emb.key)).T / np.sqrt(e.shape[1])
      att = np.exp(att - att.max()) / np.exp(att - att.max()).sum()
      scores[c] = (att @ (hist @ w(emb.value))) @ cand
    values = np.array(list(scores.values()))
    nll.append(np.log(np.exp(values - values.max()).sum()) + values.max() - scores[b])
  assert float(got) == pytest.approx(np.mean(nll), rel=1e-5)


def test_alignment_moves_the_candidates_not_the_history():
  model, _, features = _tiny_model()
  batch = {"history": jnp.array([[1, -1], [3, -1]]), "target": jnp.array([2, 4]),
           "weight": jnp.array([1.0, 1.0])}
  grads = nnx.jit(nnx.grad(lambda e: pit.alignment_loss(e, batch["history"], batch["target"],
                                                        batch["weight"], features)))(
      model.embeddings)
  free = np.abs(np.asarray(grads.free[...])).sum(-1)
  assert free[2] > 0 and free[4] > 0 and free[1] == 0 and free[3] == 0


def test_refresh_on_a_hand_case_prunes_reorders_adds_and_keeps_identifiers_unique():
  table = IdentifierTable(np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0]], np.int32),
                          np.array([0, 0, 1], np.int32), (2, 2, 2))
  usage = np.array([1.0, 9.0, 0.0])  # item 0 mostly selects its second identifier
  candidates = np.array([[[1, 0], [1, 1]], [[1, 1], [0, 0]]])
  scores = np.array([[-0.1, -0.5], [-0.2, -0.3]])
  new, stats = pit.refresh_index(table, 2, usage, candidates, scores, max_identifiers=2,
                                 prune_share=0.2)
  # item 0: (0,0|0) took 10 % < 20 %: pruned; (1,0|0) is the primary; the free slot takes
  #   (1,1), digit 1 since item 1 holds (1,1|0). item 1 (never selected) keeps (1,1|0); its
  #   free slot takes (0,0) with digit 1: the digit item 0 just gave up is not passed on.
  np.testing.assert_array_equal(new.codes, [[1, 0, 0], [1, 1, 1], [1, 1, 0], [0, 0, 1]])
  np.testing.assert_array_equal(new.item, [0, 0, 1, 1])
  assert (stats["added"], stats["pruned"], stats["rejected"]) == (2, 1, 0)
  assert stats["primary_change"] == 0.5
  kept, _ = pit.refresh_index(table, 2, usage, candidates, scores, 2, prune_share=0.1)
  np.testing.assert_array_equal(kept.codes[:2], [[1, 0, 0], [0, 0, 0]])  # 10 % stays


def test_refresh_never_maps_an_identifier_to_two_items_brute_force():
  rng = np.random.default_rng(0)
  levels, k, dedup, n, m, share = 2, 2, 3, 10, 3, 0.25
  codes = np.array(list(itertools.product(range(k), repeat=levels)))[np.arange(n) % 4]
  table = IdentifierTable(assign_dedup(codes, dedup), np.arange(n, dtype=np.int32),
                          (k,) * levels + (dedup,))
  rejected = pruned = 0
  for _ in range(30):
    usage = rng.integers(0, 5, len(table.codes)) * (rng.random(len(table.codes)) < 0.7)
    new, stats = pit.refresh_index(table, n, usage.astype(float),
                                   rng.integers(0, k, (n, 4, levels)), rng.normal(size=(n, 4)),
                                   m, share)
    assert new.duplicates() == 0  # no identifier denotes two items (or one item twice)
    count = np.bincount(new.item, minlength=n)
    assert count.min() >= 1 and count.max() <= m
    old = {tuple(r): (i, u) for r, i, u in zip(table.codes.tolist(), table.item, usage)}
    rows = [tuple(r) for r in new.codes.tolist()]
    for item in range(n):
      mine = {r: u for r, (i, u) in old.items() if i == item}
      total = sum(mine.values())
      kept = [r for r, i in zip(rows, new.item) if i == item and r in mine]
      best = max(mine, key=mine.get)  # the first most selected, in slot order
      for r, u in mine.items():  # brute force of the pruning rule
        assert (r in kept) == (total == 0 or u >= share * total or r == best)
      if total > 0:
        assert rows[list(new.item).index(item)] == best  # the primary
    for row, item in zip(rows, new.item):
      assert row not in old or old[row][0] == item  # no identifier passes to another item
    rejected += stats["rejected"]
    pruned += stats["pruned"]
    table = new
  assert rejected > 0 and pruned > 0  # full groups (4 code sequences, 3 digits each) and pruning


def test_ranking_returns_distinct_items_in_the_order_of_their_best_identifier(tmp_path):
  config = _tiny_run_config(str(tmp_path))
  from genrec_jax import stages
  mesh = stages.start_run(config, str(tmp_path / "w"))
  inter, split, _ = stages.static_data(config, str(tmp_path / "w"))
  rng = np.random.default_rng(0)
  n = split.num_items
  owners = np.concatenate([np.arange(n), rng.integers(0, n, n)]).astype(np.int32)
  codes = rng.integers(0, 8, (2 * n, 2))
  digits = np.array([sum((codes[:j] == codes[j]).all(1)) for j in range(2 * n)])
  table = IdentifierTable(np.concatenate([codes, digits[:, None]], 1).astype(np.int32), owners,
                          (8, 8, 16))
  keep = np.concatenate([np.arange(n), n + np.unique(owners[n:], return_index=True)[1]])
  table = IdentifierTable(table.codes[keep], table.item[keep], table.level_sizes)
  config.grm.beam_size = len(table.codes)  # a beam as wide as the index: an exact search
  stage = pit.CoEvolution(config, IdentifierTable(table.codes[:n], table.item[:n],
                                                  table.level_sizes),
                          np.asarray(rng.normal(size=(n, 16)), np.float32), n, mesh)
  model = stage.trainer.merge(stage.trainer.init_params)
  token_sets, count = table.item_token_sets(n, width=3)
  model.index.token_sets[...] = jnp.asarray(token_sets)
  model.index.count[...] = jnp.asarray(count)
  params = {**stage.trainer.init_params,
            pit.INDEX: nnx.state(model, lambda path, _: path[0] == pit.INDEX)}
  samples = subsample(split.test, 4, 0)
  ranked = stage.rank(params, samples)
  model = stage.trainer.merge(params)
  t5 = model.recommender
  primary = table.item_tokens(n)
  tokens = table.tokens()
  for row, history in zip(ranked[:4], samples.history[:4]):
    items = row[row >= 0]
    assert len(set(items.tolist())) == len(items)  # an item at most once
    inputs = np.concatenate([primary[h] if h >= 0 else np.zeros(3, np.int32) for h in history])
    decoder = np.pad(tokens[:, :-1], ((0, 0), (1, 0)))
    logits = forward(t5, jnp.repeat(jnp.asarray(inputs)[None], len(tokens), 0),
                     jnp.asarray(decoder))
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    score = logp[np.arange(len(tokens))[:, None], np.arange(3)[None], tokens].sum(1)
    best = {}
    for item, s in zip(table.item, score):
      best[item] = max(best.get(item, -np.inf), s)
    want = sorted(best, key=lambda i: -best[i])
    np.testing.assert_array_equal(items, want[:len(items)])
    assert len(items) == n


def _tiny_run_config(directory):
  config = tiny_config(directory, method="pit")
  config.grm.update(epochs=2, eval_every=1)
  config.pit.update(warmstart_steps=300, warmstart_batch_size=16, embedding_dim=8,
                    candidates=4, max_identifiers=3, embedding_lr=1e-2, generator_lr=3e-3)
  config.pit.generator.update(d_model=16, d_ff=32, num_heads=2, num_layers=1)
  return config


def test_run_warm_starts_the_generator_on_the_source_identifiers_and_resumes(tmp_path,
                                                                             monkeypatch):
  config = _tiny_run_config(str(tmp_path))
  reference = methods.run(config, str(tmp_path / "straight"))
  assert reference["warm_start"]["reproduced"] == 1.0  # every source identifier, exactly
  history = reference["grm_history"]
  assert len(history) == 2
  for record in history:
    assert {"rec", "generator", "align", "alternative_selected", "identifiers", "added",
            "pruned", "primary_change", "generator_top_in_index"} <= set(record)
    assert record["loss"] == pytest.approx(record["rec"] + record["generator"]
                                           + record["align"], rel=1e-5)
  assert history[0]["identifiers_per_item"] > 1  # the refresh added generated identifiers
  assert reference["index"]["duplicates"] == 0
  resumed = interrupt_then_resume(
      monkeypatch, lambda: methods.run(config, str(tmp_path / "resumed")), "pit", epoch=0)
  strip = lambda hs: [{k: v for k, v in h.items() if k != "samples_per_s"} for h in hs]
  assert strip(resumed["grm_history"]) == strip(history)
  assert resumed["metrics"]["test"] == reference["metrics"]["test"]


@pytest.mark.parametrize("field, value, message", [
    ("pit.selection", "best", "pit.selection"),
    ("pit.max_identifiers", 0, "pit.max_identifiers"),
    ("tokenizer.kind", "rqkmeans", "tokenizer.kind"),
])
def test_config_errors_name_the_field(tmp_path, field, value, message):
  config = _tiny_run_config(str(tmp_path))
  *sections, name = field.split(".")
  node = config
  for section in sections:
    node = node[section]
  node[name] = value
  with pytest.raises(ConfigError, match=message):
    check_config(config)


def test_continual_pit_row_indexes_new_items_and_reaches_the_report(tmp_path):
  config = tiny_config(str(tmp_path), method="continual", late_items=8)
  config.continual.update(methods=("ft_grm", "pit"), fractions=(0.6, 0.8))
  config.pit.update(warmstart_steps=50, warmstart_batch_size=16, embedding_dim=8,
                    candidates=4, max_identifiers=2)
  config.pit.generator.update(d_model=16, d_ff=32, num_heads=2, num_layers=1)
  results = methods.run(config, str(tmp_path / "run"))
  rows = results["methods"]["pit"]["periods"]
  assert [r["period"] for r in rows] == [1, 2]
  for row in rows:
    assert row["identifiers"]["duplicates"] == 0
    assert {"recall@10", "ndcg@10"} <= set(row["test"])
    assert 0 <= row["code_change"]["overall"] <= 1
  periods = {p["period"]: p for p in results["periods"]}
  for row in rows:  # every item of the period's catalog is indexed, the new ones included
    assert row["identifiers"]["items"] == periods[row["period"]]["catalog"]
  assert periods[1]["new_items"] + periods[2]["new_items"] > 0  # the late items arrive
  report = open(tmp_path / "run" / "report.md").read()
  assert "pit" in report
