"""Residual quantizer against NumPy, identifier invariants, RQ-VAE losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import genrec_jax
from genrec_jax.tokenizers.identifiers import (assign_dedup, collision_rate, one_to_one_table,
                                               read_identifiers_csv, write_identifiers_csv)
from genrec_jax.tokenizers.quantizer import (ResidualQuantizer, balanced_kmeans, code_usage,
                                             kmeans, sinkhorn_codes, squared_distances)
from genrec_jax.tokenizers.rqvae import RQVAE, RQVAEConfig, info_nce, rqvae_losses


def _numpy_rq(x, books):
  codes, residual, q = [], x.copy(), np.zeros_like(x)
  for book in books:
    d = ((residual[:, None, :] - book[None]) ** 2).sum(-1)
    c = d.argmin(1)
    codes.append(c)
    q += book[c]
    residual = residual - book[c]
  return np.stack(codes, 1), q


def test_quantizer_matches_numpy_and_decodes():
  rq = genrec_jax.ResidualQuantizer(3, 16, 8, rngs=nnx.Rngs(0))
  x = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
  rq.init_kmeans(jnp.asarray(x), jax.random.key(0), iterations=10)
  out = rq(jnp.asarray(x))
  codes, q = _numpy_rq(x, np.asarray(rq.codebooks[...]))
  np.testing.assert_array_equal(np.asarray(out.codes), codes)
  np.testing.assert_allclose(np.asarray(out.quantized), q, atol=1e-5)
  np.testing.assert_allclose(np.asarray(rq.decode(out.codes)), q, atol=1e-5)
  # losses by hand, "sum": squared norms over dimensions, batch mean, levels summed
  resid = np.asarray(out.residuals)
  words = np.asarray(out.codewords)
  expected = ((resid - words) ** 2).sum(axis=2).mean(axis=0).sum()
  np.testing.assert_allclose(float(out.codebook_loss), expected, rtol=1e-5)
  np.testing.assert_allclose(float(out.loss), expected * 1.25, rtol=1e-5)
  # "mean" (LETTER / DACT code: F.mse_loss per level, mean over levels)
  rq_mean = genrec_jax.ResidualQuantizer(3, 16, 8, loss_reduction="mean", rngs=nnx.Rngs(0))
  rq_mean.codebooks[...] = rq.codebooks[...]
  per_level = [((x_l - e_l) ** 2).mean() for x_l, e_l in zip(resid.transpose(1, 0, 2),
                                                             words.transpose(1, 0, 2))]
  np.testing.assert_allclose(float(rq_mean(jnp.asarray(x)).loss), 1.25 * np.mean(per_level),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="loss_reduction"):
    genrec_jax.ResidualQuantizer(3, 16, 8, loss_reduction="max", rngs=nnx.Rngs(0))


def _loss_gradients(rq, x, kind):
  """Gradients (codebooks [L, K, d], x [B, d]) of rq(x)'s `kind` ("codebook_loss" or
  "commitment_loss")."""
  grads, grad_x = nnx.grad(lambda m, v: getattr(m(v), kind), argnums=(0, 1))(rq, x)
  return np.asarray(grads["codebooks"][...]), np.asarray(grad_x)


def test_residual_passed_on_carries_no_gradient_as_in_the_reference_rqvae():
  """Reference RQ-VAE: residual = residual - (x + sg(x_q - x)), so each codebook learns only
  from its own level's codebook loss and only the level-1 commitment term reaches the input."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 4)), jnp.float32)
  rq = ResidualQuantizer(3, 8, 4, rngs=nnx.Rngs(0))
  rq.init_kmeans(x, jax.random.key(0), iterations=5)
  out = rq(x)
  codes, resid = np.asarray(out.codes), np.asarray(out.residuals)
  e = np.asarray(rq.codebooks[...])

  commit_books, commit_x = _loss_gradients(rq, x, "commitment_loss")
  np.testing.assert_array_equal(commit_books, 0.0)
  # d/dx of mean_b ||x_b - sg(e^1_{c_b})||^2: level 1 only (levels 2, 3 get detached residuals)
  np.testing.assert_allclose(commit_x, 2 * (resid[:, 0] - e[0][codes[:, 0]]) / 64,
                             atol=1e-6)
  # d/de^l_k of mean_b ||sg(v_l) - e^l_{c_l}||^2 = 2 sum_{b: c_b = k} (e^l_k - v_lb) / B
  expected = np.zeros_like(e)
  for level in range(3):
    np.add.at(expected[level], codes[:, level], 2 * (e[level][codes[:, level]] - resid[:, level]))
  book_grad, _ = _loss_gradients(rq, x, "codebook_loss")
  np.testing.assert_allclose(book_grad, expected / 64, atol=1e-6)
  # The earlier behaviour stays reachable and leaks commitment gradients into codebooks.
  leaky = ResidualQuantizer(3, 8, 4, detach_residual=False, rngs=nnx.Rngs(0))
  leaky.codebooks[...] = rq.codebooks[...]
  grad, _ = _loss_gradients(leaky, x, "commitment_loss")
  assert np.abs(grad).max() > 1e-4


def test_straight_through_gradient_is_identity():
  rq = ResidualQuantizer(2, 4, 3, rngs=nnx.Rngs(1))
  x = jnp.ones((2, 3))
  g = jax.grad(lambda v: rq(v).quantized.sum())(x)
  np.testing.assert_allclose(np.asarray(g), np.ones((2, 3)))


def test_soft_mode_and_log_probs():
  rq = ResidualQuantizer(2, 4, 3, rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(0), (5, 3))
  out = rq(x, temperature=0.5)
  np.testing.assert_allclose(np.exp(np.asarray(out.log_probs)).sum(-1), 1.0, rtol=1e-5)
  assert (np.asarray(out.log_probs).argmax(-1) == np.asarray(out.codes)).all()
  soft = rq(x, temperature=1e-4, soft=True)
  np.testing.assert_allclose(np.asarray(soft.quantized), np.asarray(out.quantized), atol=1e-3)


def test_kmeans_init_beats_random_init():
  x = jax.random.normal(jax.random.key(0), (400, 8))
  rq = ResidualQuantizer(2, 16, 8, rngs=nnx.Rngs(0))
  before = float(rq(x).codebook_loss)
  rq.init_kmeans(x, jax.random.key(1))
  assert float(rq(x).codebook_loss) < 0.7 * before


def _sinkhorn_reference(d, epsilon, iterations):
  """The LC-Rec / LETTER PyTorch algorithm, transcribed to float64 NumPy."""
  middle = (d.max() + d.min()) / 2
  d = (d - middle) / (d.max() - middle + 1e-5)
  q = np.exp(-d.astype(np.float64) / epsilon)
  b, k = q.shape
  q /= q.sum()
  for _ in range(iterations):
    q /= q.sum(axis=1, keepdims=True)
    q /= b
    q /= q.sum(axis=0, keepdims=True)
    q /= k
  return np.argmax(q * b, axis=-1)


def test_sinkhorn_codes_balance_a_collapsed_batch_and_keep_a_balanced_one():
  rng = np.random.default_rng(0)
  codebook = jnp.asarray(rng.normal(size=(8, 4)) * 5)
  # Every vector sits near codeword 0: argmin collapses, Sinkhorn spreads them evenly.
  near_zero = codebook[0] + jnp.asarray(rng.normal(size=(64, 4)) * 0.5)
  dist = squared_distances(near_zero, codebook)
  assert len(set(np.asarray(jnp.argmin(dist, -1)).tolist())) == 1
  codes = np.asarray(sinkhorn_codes(dist, 0.003))
  np.testing.assert_array_equal(codes, _sinkhorn_reference(np.asarray(dist), 0.003, 50))
  counts = np.bincount(codes, minlength=8)
  assert counts.max() <= 12 and counts.min() >= 4, counts
  # Eight vectors near each codeword: already balanced, Sinkhorn agrees with argmin.
  balanced = jnp.repeat(codebook, 8, axis=0) + jnp.asarray(rng.normal(size=(64, 4)) * 0.1)
  dist = squared_distances(balanced, codebook)
  np.testing.assert_array_equal(np.asarray(sinkhorn_codes(dist, 0.003)),
                                np.asarray(jnp.argmin(dist, -1)))
  rq = ResidualQuantizer(num_levels=2, codebook_size=8, dim=4, rngs=nnx.Rngs(0))
  out = rq(near_zero, sinkhorn_epsilons=(0.0, 0.003))
  assert np.bincount(np.asarray(out.codes[:, 1]), minlength=8).max() <= 12
  with pytest.raises(ValueError, match="one value per level"):
    rq(near_zero, sinkhorn_epsilons=(0.003,))


def test_balanced_kmeans_caps_group_sizes_and_finds_equal_clusters():
  rng = np.random.default_rng(1)
  # One dense blob of 200 points and 5 small ones: plain k-means gives the blob a huge group.
  centres = 5 * np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [-1, 0, 0], [0, -1, 0]])
  x = np.concatenate([rng.normal(size=(200, 3)) * 0.1] +
                     [rng.normal(size=(10, 3)) * 0.1 + c for c in centres])
  plain = np.asarray(jnp.argmin(squared_distances(
      jnp.asarray(x, jnp.float32), kmeans(jnp.asarray(x, jnp.float32), 10, jax.random.key(0))),
      -1))
  assert np.bincount(plain, minlength=10).max() > 25
  labels = balanced_kmeans(x, 10, seed=0)
  assert np.bincount(labels, minlength=10).max() <= 25
  # Four well-separated equal clusters are found exactly.
  centres = np.eye(4) * 10
  y = np.repeat(centres, 16, axis=0) + rng.normal(size=(64, 4)) * 0.1
  labels = balanced_kmeans(y, 4, seed=3)
  truth = np.repeat(np.arange(4), 16)
  assert len({(a, b) for a, b in zip(labels, truth)}) == 4


def test_quantizer_rejects_wrong_shape():
  rq = ResidualQuantizer(2, 4, 3, rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match=r"expects \[batch, 3\]"):
    rq(jnp.ones((2, 5)))


def test_dedup_makes_identifiers_unique_and_is_stable():
  rng = np.random.default_rng(0)
  codes = rng.integers(0, 3, (500, 2))
  full = assign_dedup(codes, dedup_size=200)
  assert np.unique(full, axis=0).shape[0] == 500
  # digits are ranks within groups in item order
  group0 = np.flatnonzero((codes == codes[0]).all(1))
  assert full[group0, -1].tolist() == list(range(len(group0)))
  # preferred digits are kept when free
  preferred = full[:, -1].copy()
  codes2 = codes.copy()
  codes2[:10] = rng.integers(0, 3, (10, 2))
  preferred[:10] = -1
  full2 = assign_dedup(codes2, dedup_size=200, preferred=preferred)
  assert np.unique(full2, axis=0).shape[0] == 500
  unchanged = np.arange(10, 500)
  kept = (full2[unchanged, -1] == full[unchanged, -1]).mean()
  assert kept == 1.0


def test_dedup_overflow_is_a_clear_error():
  with pytest.raises(ValueError, match="dedup vocabulary"):
    assign_dedup(np.zeros((5, 2), int), dedup_size=4)


def test_identifiers_csv_round_trip(tmp_path):
  full = assign_dedup(np.array([[0, 1], [0, 1], [2, 3]]), 4)
  table = one_to_one_table(full, 4, 4)
  ids = np.array(["A", "B", "C"])
  write_identifiers_csv(str(tmp_path / "identifiers.csv"), table, ids)
  lines = (tmp_path / "identifiers.csv").read_text().splitlines()
  assert lines[0] == "item,code_1,code_2,dedup" and lines[2] == "B,0,1,1"
  back, back_ids = read_identifiers_csv(str(tmp_path / "identifiers.csv"), 4, 4, ids[::-1])
  np.testing.assert_array_equal(back.codes, table.codes)
  np.testing.assert_array_equal(back.item, [2, 1, 0])  # rows mapped to the given ids' indices
  same, file_ids = read_identifiers_csv(str(tmp_path / "identifiers.csv"), 4, 4)
  np.testing.assert_array_equal(file_ids, ids)
  np.testing.assert_array_equal(same.item, [0, 1, 2])
  assert collision_rate(full[:, :2]) == pytest.approx(2 / 3)


def test_code_usage_perplexity():
  stats = code_usage(np.array([[0], [1], [2], [3]]), 8)
  assert stats["usage"] == [0.5] and stats["perplexity"][0] == pytest.approx(4.0)


def test_info_nce_by_hand():
  a = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
  b = np.array([[1.0, 0.0], [1.0, 1.0]], np.float32)
  bn = b / np.linalg.norm(b, axis=1, keepdims=True)
  logits = a @ bn.T / 0.5
  expected = -np.mean([logits[i, i] - np.log(np.exp(logits[i]).sum()) for i in range(2)])
  assert float(info_nce(jnp.asarray(a), jnp.asarray(b), 0.5)) == pytest.approx(expected, 1e-5)


def test_rqvae_losses_and_training_reduce_loss():
  import optax
  from genrec_jax.methods.letter import DiversityRegularizer
  cfg = RQVAEConfig(input_dim=12, hidden_dims=(16,), latent_dim=4, num_levels=2,
                    codebook_size=8, cf_weight=0.1)
  diversity = DiversityRegularizer(1e-2)
  model = RQVAE(cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (64, 12))
  cf = jax.random.normal(jax.random.key(1), (64, 4))
  groups = jnp.tile(jnp.arange(8) % 2, (2, 1))
  model.quantizer.init_kmeans(model.encoder(x), jax.random.key(3))
  graphdef, params = nnx.split(model)
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  def loss(p):
    return rqvae_losses(nnx.merge(graphdef, p), x, cf, lambda m, out: diversity.loss(
        m, out, {"groups": groups}, jax.random.key(2)))

  @jax.jit
  def step(p, o):
    (_, parts), grads = jax.value_and_grad(loss, has_aux=True)(p)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, parts

  first = loss(params)[1]
  for _ in range(200):
    params, opt, _ = step(params, opt)
  _, parts = loss(params)
  assert set(parts) == {"recon", "quant", "cf", "diversity", "total"}
  assert float(parts["total"]) < 0.7 * float(first["total"])
  assert float(parts["recon"]) < 0.7 * float(first["recon"])


def test_kmeans_refresh_refits_the_codebooks_to_the_moved_encoder():
  import dataclasses
  from genrec_jax.training.tokenizer import TokenizerTrainConfig, encode_items, train_tokenizer
  rng = np.random.default_rng(0)
  x = (np.repeat(rng.normal(size=(32, 12)) * 3, 16, axis=0)
       + rng.normal(size=(512, 12)) * 0.1).astype(np.float32)
  cfg = RQVAEConfig(input_dim=12, hidden_dims=(16,), latent_dim=4, num_levels=2,
                    codebook_size=16)
  train_cfg = TokenizerTrainConfig(length=30, unit="steps", batch_size=128, learning_rate=3e-2,
                                   kmeans_iterations=10)
  plain, _ = train_tokenizer(cfg, train_cfg, x, seed=0)
  refreshed, _ = train_tokenizer(
      cfg, dataclasses.replace(train_cfg, kmeans_refresh_steps=(29,)), x, seed=0)
  usage = [code_usage(encode_items(m, x), 16)["usage"][0] for m in (plain, refreshed)]
  assert usage[1] >= 0.9 and usage[1] > usage[0], usage
  with pytest.raises(ValueError, match="kmeans_refresh_steps"):
    train_tokenizer(cfg, dataclasses.replace(train_cfg, kmeans_refresh_steps=(30,)), x)


class _NoisyPull:
  """A regularizer that reads its key and a context refreshed every 5 steps."""

  refresh_steps = 5

  def context(self, model, step):
    return {"target": jnp.full((4,), 0.1 * step, jnp.float32)}

  def loss(self, model, output, context, key):
    noise = jax.random.normal(key, output.latent.shape)
    term = 0.01 * jnp.mean((output.latent + noise - context["target"]) ** 2)
    return term, {"pull": term}


def test_tokenizer_steps_in_one_dispatch_make_the_same_updates_refreshes_and_selection():
  """Several updates per call (a scan) against one per call: dispatches are cut at the k-means
  refresh, the regularizer's refreshes, the evaluations and the progress lines, and each step
  keeps its key, so the same model and selection result."""
  import dataclasses
  from genrec_jax.training.tokenizer import TokenizerTrainConfig, encode_items, train_tokenizer
  rng = np.random.default_rng(0)
  x = rng.normal(size=(256, 12)).astype(np.float32)
  cfg = RQVAEConfig(input_dim=12, hidden_dims=(16,), latent_dim=4, num_levels=2,
                    codebook_size=8)
  one = TokenizerTrainConfig(length=8, unit="epochs", batch_size=64, learning_rate=1e-2,
                             kmeans_iterations=5, kmeans_refresh_steps=(13,),
                             selection="min_collision", eval_every=3, log_every=16)
  runs = [train_tokenizer(cfg, dataclasses.replace(one, steps_per_dispatch=k), x, seed=0,
                          regularizer=_NoisyPull()) for k in (1, 4)]
  (model1, stats1), (model4, stats4) = runs
  for a, b in zip(jax.tree.leaves(nnx.state(model1)), jax.tree.leaves(nnx.state(model4))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6)
  np.testing.assert_array_equal(encode_items(model1, x), encode_items(model4, x))
  assert stats1["selected_step"] == stats4["selected_step"]
  assert [e["step"] for e in stats1["collision_evaluations"]] == [12, 24, 32]
  assert stats1["collision_evaluations"] == stats4["collision_evaluations"]


def test_diversity_loss_shapes_only_the_codebook_and_matches_numpy():
  """LETTER's diversity loss: the query is the raw assigned codeword; with groups of two
  codewords the positive is the other member, so the loss is a plain cross-entropy."""
  from genrec_jax.methods.letter import diversity_loss
  cfg = RQVAEConfig(input_dim=6, hidden_dims=(8,), latent_dim=4, num_levels=2,
                    codebook_size=8)
  model = RQVAE(cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (32, 6))
  model.quantizer.init_kmeans(model.encoder(x), jax.random.key(1), iterations=5)
  groups = jnp.tile(jnp.arange(8) // 2, (2, 1))  # pairs {0, 1}, {2, 3}, ...

  def loss(m):
    out = m(x)
    return diversity_loss(out.quant, m.quantizer.codebooks[...], groups, jax.random.key(2))

  value, grads = nnx.value_and_grad(loss)(model)
  books = np.asarray(model.quantizer.codebooks[...], np.float64)
  codes = np.asarray(model(x).quant.codes)
  expected = []
  for level in range(2):
    query = books[level][codes[:, level]]
    logits = query @ books[level].T
    logits[np.arange(32), codes[:, level]] = -np.inf
    positive = codes[:, level] ^ 1
    log_z = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    expected.append(np.mean(log_z - logits[np.arange(32), positive]))
  np.testing.assert_allclose(float(value), np.mean(expected), rtol=1e-5)
  encoder_grads = jax.tree.leaves(nnx.state(grads.encoder))
  assert all(np.abs(np.asarray(g)).max() == 0 for g in encoder_grads)
  assert np.abs(np.asarray(grads.quantizer.codebooks[...])).max() > 0


def test_balanced_kmeans_respects_letter_size_bounds():
  from genrec_jax.tokenizers.quantizer import letter_group_sizes
  assert letter_group_sizes(256, 10) == (10, 60)
  rng = np.random.default_rng(2)
  # 200 codewords in one tight blob and 56 spread out: the blob may not take more than 60,
  # and no group may be left with fewer than 10.
  x = np.concatenate([rng.normal(size=(200, 4)) * 0.01, rng.normal(size=(56, 4)) * 5])
  labels = balanced_kmeans(x, 10, seed=0, size_min=10, size_max=60)
  sizes = np.bincount(labels, minlength=10)
  assert sizes.min() >= 10 and sizes.max() <= 60, sizes
  assert sizes.max() > 26  # not forced to equal sizes (ceil(256 / 10))
  with pytest.raises(ValueError, match="cannot hold"):
    balanced_kmeans(x, 10, size_min=30, size_max=60)
