"""ETEGRec's alignment losses against NumPy transcriptions of the paper's eqs. 15-16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from genrec_jax.methods.etegrec import first_occurrence, level_log_probs, psa_loss, sia_loss
from genrec_jax.tokenizers.quantizer import ResidualQuantizer


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_first_occurrence_marks_each_distinct_items_first_row():
  items = jnp.array([3, 1, 3, -1, 1, 2, -1])
  np.testing.assert_array_equal(first_occurrence(items),
                                [True, True, False, False, False, True, False])


@pytest.mark.parametrize("level_reduction", ["sum", "mean"])
def test_sia_is_the_symmetric_kl_over_levels_averaged_over_masked_rows(level_reduction):
  rng = np.random.default_rng(0)
  log_t = _log_softmax(rng.normal(size=(5, 3, 4)))
  log_s = _log_softmax(rng.normal(size=(5, 3, 4)))
  mask = np.array([True, False, True, True, False])
  per_row = []
  for b in np.flatnonzero(mask):
    levels = []
    for level in range(3):
      p, q = np.exp(log_t[b, level]), np.exp(log_s[b, level])
      levels.append(np.sum(p * np.log(p / q)) + np.sum(q * np.log(q / p)))
    per_row.append(np.sum(levels) if level_reduction == "sum" else np.mean(levels))
  got = sia_loss(jnp.asarray(log_t), jnp.asarray(log_s), jnp.asarray(mask), level_reduction)
  np.testing.assert_allclose(got, np.mean(per_row), rtol=1e-5)
  assert float(sia_loss(jnp.asarray(log_t), jnp.asarray(log_t), jnp.asarray(mask))) == 0.0
  with pytest.raises(ValueError, match="sia_level_reduction"):
    sia_loss(jnp.asarray(log_t), jnp.asarray(log_s), jnp.asarray(mask), "max")


def test_psa_is_the_symmetric_infonce_over_the_masked_rows_only():
  rng = np.random.default_rng(1)
  z, h = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
  mask = np.array([True, True, False, True, False, True])
  rows = np.flatnonzero(mask)
  zn = z[rows] / np.linalg.norm(z[rows], axis=1, keepdims=True)
  hn = h[rows] / np.linalg.norm(h[rows], axis=1, keepdims=True)
  sim = zn @ hn.T / 0.07  # the masked-out rows are neither anchors nor negatives
  expected = (-np.mean(np.diag(_log_softmax(sim))) - np.mean(np.diag(_log_softmax(sim.T))))
  got = psa_loss(jnp.asarray(z, jnp.float32), jnp.asarray(h, jnp.float32), jnp.asarray(mask))
  np.testing.assert_allclose(got, expected, rtol=1e-4)
  grads = jax.grad(lambda a: psa_loss(a, jnp.asarray(h, jnp.float32), jnp.asarray(mask)))(
      jnp.asarray(z, jnp.float32))
  assert np.isfinite(grads).all() and not np.asarray(grads)[~mask].any()


def test_level_log_probs_follow_the_hard_residual_with_either_sign():
  rq = ResidualQuantizer(2, 4, 3, rngs=nnx.Rngs(0))
  x = np.random.default_rng(2).normal(size=(5, 3)).astype(np.float32)
  books = np.asarray(rq.codebooks[...], np.float64)
  residual, want = x.astype(np.float64), []
  for level in range(2):
    d = ((residual[:, None, :] - books[level][None]) ** 2).sum(-1)
    want.append(d)
    residual = residual - books[level][d.argmin(1)]
  want = np.stack(want, 1)
  np.testing.assert_allclose(level_log_probs(rq, jnp.asarray(x)), _log_softmax(-want),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(level_log_probs(rq, jnp.asarray(x), "code"), _log_softmax(want),
                             rtol=1e-4, atol=1e-5)
  # The residual entering level 2 carries no gradient: only level 1 reaches the latents.
  level2 = jax.grad(lambda v: level_log_probs(rq, v)[:, 1].sum())(jnp.asarray(x))
  assert not np.asarray(level2).any()
  with pytest.raises(ValueError, match="sia_logit_sign"):
    level_log_probs(rq, jnp.asarray(x), "plus")
