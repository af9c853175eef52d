"""The continual CF model (SASRec): items of later periods stay out until they exist."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from genrec_jax.data.splits import SampleSet
from genrec_jax.recommenders.sasrec import SASRec, SASRecConfig
from genrec_jax.training.sasrec import SASRecTrainConfig, SASRecTrainer, sasrec_loss
from genrec_jax.training.sharding import make_mesh
from genrec_jax.training.trainer import MODEL_GROUP

NUM_ITEMS = 10
KNOWN = np.arange(NUM_ITEMS) < 7  # items 7, 8, 9 arrive in a later period


def _trainer(loss="ce"):
  model_cfg = SASRecConfig(num_items=NUM_ITEMS, hidden_dim=8, num_layers=1, num_heads=1,
                           max_len=4, dropout_rate=0.0)
  cfg = SASRecTrainConfig(loss=loss, batch_size=8, eval_batch_size=8, length_buckets=(4,))
  return SASRecTrainer(model_cfg, cfg, make_mesh(), seed=0)


def _batch():
  history = np.array([[-1, 0, 1, 2], [-1, -1, 3, 4], [5, 0, 1, 6]], np.int32)  # -1 = pad
  targets = np.array([[-1, 1, 2, 3], [-1, -1, 4, 5], [0, 1, 2, 6]], np.int32)
  return {"history": jnp.asarray(history), "target": jnp.asarray(targets)}


@pytest.mark.parametrize("loss_name", ["ce", "bce"])
def test_unseen_items_are_no_negatives_and_get_no_gradient(loss_name):
  trainer = _trainer(loss_name)
  batch, known = _batch(), jnp.asarray(KNOWN)
  def loss(params):
    return sasrec_loss(trainer.trainer.merge(params), batch, jax.random.key(0),
                       {"known": known}, loss=loss_name)[0]
  value, grads = jax.jit(jax.value_and_grad(loss))(trainer.init_params)
  table_grad = np.asarray(grads[MODEL_GROUP]["item_embed"]["embedding"][...])[1:]  # [items, d]
  assert np.isfinite(float(value))
  np.testing.assert_array_equal(table_grad[~KNOWN], 0.0)
  assert np.abs(table_grad[KNOWN]).max() > 0
  if loss_name == "ce":  # against a NumPy softmax over the known items only
    model = trainer.trainer.merge(trainer.init_params)
    logits = nnx.jit(lambda m, h: m.logits(m(h)))(model, batch["history"] + 1)
    logits = np.asarray(logits, np.float64)[..., KNOWN]
    targets = np.asarray(batch["target"])
    log_z = np.log(np.exp(logits).sum(-1))
    picked = np.take_along_axis(logits, np.maximum(targets, 0)[..., None], -1)[..., 0]
    expected = (log_z - picked)[targets >= 0].mean()
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)


def test_ranking_skips_unseen_items_and_new_items_start_fresh():
  trainer = _trainer()
  samples = SampleSet(history=np.array([[0, 1, 2, 3], [4, 5, 6, 0]], np.int32),
                      target=np.array([4, 1], np.int32), user=np.array([0, 1], np.int32))
  ranked = trainer.rank(trainer.init_params, samples, k=7, known_items=KNOWN)
  assert set(ranked.ravel().tolist()) == set(range(7))
  trained = jax.tree.map(lambda leaf: leaf + 1.0, trainer.init_params)
  reset = trainer.reset_item_rows(trained, np.array([7, 9]), seed=5)
  fresh = np.asarray(nnx.split(SASRec(trainer.model_cfg, rngs=nnx.Rngs(5)))[1]
                     ["item_embed"]["embedding"][...])
  before = np.asarray(trained[MODEL_GROUP]["item_embed"]["embedding"][...])
  after = np.asarray(reset[MODEL_GROUP]["item_embed"]["embedding"][...])
  np.testing.assert_array_equal(after[[8, 10]], fresh[[8, 10]])  # rows of items 7, 9
  keep = np.setdiff1d(np.arange(NUM_ITEMS + 1), [8, 10])
  np.testing.assert_array_equal(after[keep], before[keep])
  np.testing.assert_array_equal(
      np.asarray(trained[MODEL_GROUP]["item_embed"]["embedding"][...]), before)
  with pytest.raises(ValueError, match="known_items"):
    trainer.rank(trainer.init_params, samples, known_items=np.zeros(3, bool))


def test_sasrec_with_several_steps_per_dispatch_trains_as_single_steps(tmp_path):
  """BCE draws its negatives from the step key and dropout is on: 3 window batches per call
  (one bucket, a filler step at the end) make the updates of one batch per call."""
  from genrec_jax.training.loop import LoopConfig
  rng = np.random.default_rng(0)
  history = rng.integers(0, 30, (50, 4)).astype(np.int32)
  windows = SampleSet(history=history, target=np.roll(history, -1, axis=1),
                      user=np.arange(50, dtype=np.int32))
  valid = SampleSet(history=history[:8], target=history[:8, -1],
                    user=np.arange(8, dtype=np.int32))
  runs = []
  for k in (1, 3):
    trainer = SASRecTrainer(
        SASRecConfig(num_items=30, hidden_dim=8, num_layers=1, num_heads=1, max_len=4,
                     dropout_rate=0.3),
        SASRecTrainConfig(loss="bce", batch_size=8, eval_batch_size=8, length_buckets=(4,),
                          steps_per_dispatch=k), make_mesh(), seed=0)
    params, state = trainer.train(windows, valid, str(tmp_path / f"k{k}"),
                                  loop_cfg=LoopConfig(epochs=2, eval_every=2))
    runs.append((jax.tree.leaves(params), [h["loss"] for h in state["history"]]))
  assert -(-50 // 8) % 3 != 0  # the last call carries filler steps
  np.testing.assert_allclose(runs[0][1], runs[1][1], rtol=1e-5)
  for a, b in zip(runs[0][0], runs[1][0]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
