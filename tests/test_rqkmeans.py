"""RQ-k-means (issue 15): the mini-batch update against NumPy, cluster recovery, identifiers
that the quantizer layer reproduces and that are unique after the dedup digit."""

import jax.numpy as jnp
import numpy as np
import pytest

from genrec_jax.tokenizers.identifiers import assign_dedup
from genrec_jax.tokenizers.rqkmeans import fit_rq_kmeans, minibatch_kmeans, minibatch_step


def test_minibatch_step_is_the_running_mean_of_assigned_vectors():
  centroids = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
  counts = np.array([2.0, 0.0, 1.0])
  batch = np.array([[1.0, 1.0], [9.0, 1.0], [11.0, -1.0], [0.5, 0.0]])
  got_c, got_n = minibatch_step(jnp.asarray(centroids), jnp.asarray(counts), jnp.asarray(batch))
  # by hand: centroid 0 gets rows 0 and 3, centroid 1 rows 1 and 2, centroid 2 none
  want_c = np.array([[(0 * 2 + 1.0 + 0.5) / 4, (0 * 2 + 1.0 + 0.0) / 4],
                     [(9.0 + 11.0) / 2, (1.0 - 1.0) / 2], [0.0, 10.0]])
  np.testing.assert_allclose(got_c, want_c, rtol=1e-6)
  np.testing.assert_allclose(got_n, [4.0, 2.0, 1.0])


def test_minibatch_kmeans_recovers_separated_clusters():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(8, 5)) * 20
  x = (centres[rng.integers(0, 8, 4000)] + rng.normal(size=(4000, 5))).astype(np.float32)
  import jax
  found = np.asarray(minibatch_kmeans(jnp.asarray(x), 8, jax.random.key(0), batch_size=512,
                                      steps=50))
  nearest = ((centres[:, None] - found[None]) ** 2).sum(-1).min(1)
  # every true centre has a centroid within the noise (some seeds may merge two clusters
  # with random initialisation; this seed does not)
  assert nearest.max() < 1.0


def test_rq_kmeans_identifiers_are_reproduced_by_the_layer_and_unique():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3000, 6)).astype(np.float32)
  quantizer, codes = fit_rq_kmeans(x, num_levels=3, codebook_size=16, seed=0, batch_size=256,
                                   steps=30)
  assert codes.shape == (3000, 3) and codes.dtype == np.int32
  np.testing.assert_array_equal(np.asarray(quantizer.encode(jnp.asarray(x))), codes)
  identifiers = assign_dedup(codes, 64)
  assert len(np.unique(identifiers, axis=0)) == len(x)
  # the residual levels carry information: every level uses most of its codes
  assert all(len(np.unique(codes[:, level])) >= 12 for level in range(3))
  # deterministic for a seed
  np.testing.assert_array_equal(fit_rq_kmeans(x, 3, 16, 0, batch_size=256, steps=30)[1], codes)


def test_rq_kmeans_rejects_bad_input():
  with pytest.raises(ValueError, match="N >= codebook_size"):
    fit_rq_kmeans(np.zeros((10, 4)), 2, 16)
  bad = np.ones((40, 4))
  bad[3, 1] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    fit_rq_kmeans(bad, 2, 16)


def test_tiger_runs_with_rq_kmeans_identifiers_and_resumes_them(tmp_path):
  from genrec_jax import methods
  from genrec_jax.config import ConfigError, check_config
  from tests.conftest import tiny_config
  config = tiny_config(str(tmp_path))
  config.tokenizer.update(kind="rqkmeans", train_length=20)
  config.grm.update(epochs=2)
  first = methods.run(config, str(tmp_path / "run"))
  assert first["tokenizer"]["collision_rate"] < 1.0 and "seconds" in first["tokenizer"]
  again = methods.run(config, str(tmp_path / "run"))  # the stored codebooks and table
  assert again["tokenizer"] == first["tokenizer"]
  assert again["metrics"]["test"] == first["metrics"]["test"]
  config.method = "letter"
  with pytest.raises(ConfigError, match="tokenizer.kind='rqkmeans'"):
    check_config(config)
