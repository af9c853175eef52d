"""ETEGRec: the alignment losses against NumPy transcriptions of the paper's eqs. 15-16, the
identifier refresh, the freezing of each phase, and whole runs (resume mid-cycle, ablations)."""

import csv
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from genrec_jax import methods
from genrec_jax.config import ConfigError
from genrec_jax.methods.etegrec import (AlignmentConfig, ETEGRec, Recommender, etegrec_loss,
                                        semantic_quantization_loss)
from genrec_jax.recommenders.t5 import T5Config
from genrec_jax.tokenizers.identifiers import assign_dedup, refresh_identifiers
from genrec_jax.tokenizers.quantizer import ResidualQuantizer
from genrec_jax.tokenizers.rqvae import RQVAE, RQVAEConfig
from genrec_jax.training.alignment import (first_occurrence, level_log_probs,
                                          symmetric_info_nce as psa_loss,
                                          symmetric_kl as sia_loss)
from genrec_jax.training.sharding import make_mesh
from genrec_jax.training.trainer import Trainer
from tests.conftest import interrupt_then_resume, tiny_config


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
  with pytest.raises(ValueError, match="level_reduction"):
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
  with pytest.raises(ValueError, match="logit_sign"):
    level_log_probs(rq, jnp.asarray(x), "plus")


def test_refresh_keeps_the_digit_of_items_whose_codes_did_not_change():
  rng = np.random.default_rng(0)
  n, k = 60, 3
  previous = assign_dedup(rng.integers(0, k, (n, 2)), dedup_size=n)
  codes = previous[:, :2].copy()
  changed = rng.random(n) < 0.4
  codes[changed] = rng.integers(0, k, (changed.sum(), 2))
  really_changed = np.any(codes != previous[:, :2], axis=1)
  identifiers, stats = refresh_identifiers(codes, previous, dedup_size=n)
  assert len({tuple(r) for r in identifiers}) == n  # unique
  np.testing.assert_array_equal(identifiers[~really_changed], previous[~really_changed])
  # Changed items take, in item order, the smallest digits their group's kept items left free.
  for group in {tuple(c) for c in codes}:
    members = np.flatnonzero(np.all(codes == group, axis=1))
    kept = {int(previous[i, -1]) for i in members if not really_changed[i]}
    free = [d for d in range(n) if d not in kept]
    moved = [i for i in members if really_changed[i]]
    assert [int(identifiers[i, -1]) for i in moved] == free[:len(moved)]
  assert stats["code_change"] == pytest.approx(really_changed.mean())
  assert stats["identifier_change"] == pytest.approx(
      np.any(identifiers != previous, axis=1).mean())
  assert stats["refresh_skipped"] == 0
  # More items on one code sequence than dedup digits: the previous identifiers stay.
  kept, stats = refresh_identifiers(np.zeros((n, 2), np.int64), previous, dedup_size=n - 1)
  np.testing.assert_array_equal(kept, previous)
  assert stats["refresh_skipped"] == 1 and stats["code_change"] > 0


def test_semantic_quantization_loss_per_row_matches_numpy():
  cfg = RQVAEConfig(input_dim=6, hidden_dims=(5,), latent_dim=4, num_levels=2, codebook_size=3,
                    loss_reduction="mean")
  model = RQVAE(cfg, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(7, 6)), jnp.float32)
  out = model(x)
  got = semantic_quantization_loss(x, out, beta=0.25)
  latent = np.asarray(model.encoder(x), np.float64)
  books = np.asarray(model.quantizer.codebooks[...], np.float64)
  residual, quantization, quantized = latent, np.zeros(7), np.zeros_like(latent)
  for level in range(2):
    chosen = books[level][np.argmin(((residual[:, None] - books[level][None]) ** 2).sum(-1), 1)]
    # codebook and commitment terms have the same value: (1 + beta) * mean squared gap
    quantization += 1.25 * np.mean((residual - chosen) ** 2, -1) / 2
    quantized += chosen
    residual = residual - chosen
  recon = np.asarray(model.decoder(jnp.asarray(quantized, jnp.float32)), np.float64)
  expected = np.mean((np.asarray(x) - recon) ** 2, -1) + quantization
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def _tiny_joint_trainer():
  num_items = 12
  tokenizer = RQVAE(RQVAEConfig(input_dim=6, hidden_dims=(8,), latent_dim=4, num_levels=2,
                                codebook_size=4, loss_reduction="mean"), rngs=nnx.Rngs(0))
  t5 = T5Config(vocab_size=1 + 4 + 4 + 8, d_model=8, d_ff=16, num_heads=2, d_kv=4,
                num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.0)
  rng = np.random.default_rng(0)
  codes = assign_dedup(rng.integers(0, 4, (num_items, 2)), dedup_size=8)
  tokens = codes + np.array([1, 5, 9])[None, :]
  model = ETEGRec(tokenizer, Recommender(t5, 4, 6, rngs=nnx.Rngs(1)), tokens)
  loss = functools.partial(etegrec_loss, cfg=AlignmentConfig(sia_weight=1.0, psa_weight=1.0,
                                                             level_sizes=(4, 4, 8)))
  groups = {"tokenizer": optax.adamw(1e-2, weight_decay=0.05),
            "recommender": optax.adamw(1e-2, weight_decay=0.05),
            "identifiers": optax.set_to_zero()}
  trainer = Trainer(model, loss, groups, make_mesh())
  batch = {"history": jnp.asarray(rng.integers(-1, num_items, (8, 5)), jnp.int32),
           "target": jnp.asarray(rng.integers(0, num_items, 8), jnp.int32),
           "weight": jnp.ones(8), "align": jnp.ones(8)}
  context = {"cf": jnp.asarray(rng.normal(size=(num_items, 6)), jnp.float32)}
  return trainer, batch, context


@pytest.mark.parametrize("phase,frozen", [(("recommender",), ("tokenizer", "identifiers")),
                                          (("tokenizer",), ("recommender", "identifiers"))])
def test_each_phase_changes_only_its_own_group(phase, frozen):
  trainer, batch, context = _tiny_joint_trainer()
  before = jax.tree.map(np.asarray, trainer.init_params)
  params = jax.tree.map(jnp.copy, trainer.init_params)
  opt_state = trainer.init_opt_state(params)
  for step in range(2):
    params, opt_state, metrics = trainer.train_step(params, opt_state, batch,
                                                    jax.random.key(step), context, phase)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
  after = jax.tree.map(np.asarray, params)
  for group in frozen:  # exactly unchanged, weight decay included
    for a, b in zip(jax.tree.leaves(before[group]), jax.tree.leaves(after[group])):
      np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[phase[0]]),
                                                       jax.tree.leaves(after[phase[0]])))


def _tiny_run_config(directory):
  config = tiny_config(directory, method="etegrec")
  config.embeddings.source = "cf"
  config.grm.update(level_softmax=True, constrained=False)
  config.etegrec.update(epochs=4, eval_every=2, align_warmup_epochs=1, finetune_epochs=1,
                        recommender_warmup_steps=5, tokenizer_warmup_steps=5,
                        recommender_lr=1e-2, tokenizer_lr=1e-3)
  return config


def test_run_resumes_mid_cycle_to_the_same_numbers_with_unique_identifiers(tmp_path,
                                                                            monkeypatch):
  config = _tiny_run_config(str(tmp_path))
  reference = methods.run(config, str(tmp_path / "straight"))
  history = reference["joint"]["history"]
  assert [("code_change" in h) for h in history] == [True, False, True, False]
  assert set(reference["metrics"]) >= {"test_constrained", "test_unconstrained", "valid"}
  with open(tmp_path / "straight" / "identifiers.csv") as f:
    rows = [tuple(r.values())[1:] for r in csv.DictReader(f)]
  assert len(rows) == 48 and len(set(rows)) == 48

  # crash after the first cycle's tokenizer epoch, then resume
  resumed = interrupt_then_resume(
      monkeypatch, lambda: methods.run(config, str(tmp_path / "resumed")), "etegrec", epoch=0)
  strip = lambda hs: [{k: v for k, v in h.items() if k != "samples_per_s"} for h in hs]
  assert strip(resumed["joint"]["history"]) == strip(history)
  assert resumed["metrics"]["test_unconstrained"] == reference["metrics"]["test_unconstrained"]

  config.etegrec.cycle = 3  # a stored run of other settings is refused, not mixed in
  with pytest.raises(ConfigError, match="etegrec.cycle"):
    methods.run(config, str(tmp_path / "resumed"))


def test_ablations_run_as_config_switches(tmp_path):
  config = _tiny_run_config(str(tmp_path))
  config.etegrec.update(alternate=False, end_to_end=False, sia_weight=0.0, epochs=2,
                        eval_every=1)
  results = methods.run(config, str(tmp_path / "ablation"))
  history = results["joint"]["history"]
  assert all("code_change" in h for h in history)  # joint updates refresh after every epoch
  assert results["metrics"]["best_epoch"] >= 1  # the fresh recommender's own training
  assert len(results["recommender_history"]) >= 1
