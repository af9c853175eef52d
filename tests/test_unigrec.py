"""UniGRec: the soft tokenizer and its uniformity term against NumPy, the annealing schedule,
gradient flow from the recommendation loss into the tokenizer, the joint objective's
composition, and whole runs (resume after an interrupt, ablations, config errors)."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from genrec_jax import methods
from genrec_jax.config import ConfigError, check_config
from genrec_jax.data.batching import item_batches
from genrec_jax.evaluation.metrics import metrics_from_ranks, target_ranks
from genrec_jax.methods.unigrec import (JointConfig, Recommender, UniGRec, halving_dims,
                                        joint_temperature, unigrec_loss)
from genrec_jax.recommenders.t5 import T5, T5Config
from genrec_jax.tokenizers.quantizer import ResidualQuantizer
from genrec_jax.tokenizers.rqvae import RQVAE, RQVAEConfig, codeword_uniformity, rqvae_losses
from genrec_jax.training.grm import soft_identifier_inputs
from genrec_jax.training.tokenizer import (TokenizerTrainConfig, encode_items, final_temperature,
                                           temperature_at, train_tokenizer)
from tests.conftest import interrupt_then_resume, tiny_config


def _softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def test_soft_quantizer_equals_a_numpy_transcription():
  rq = ResidualQuantizer(3, 5, 4, rngs=nnx.Rngs(0))
  books = np.asarray(rq.codebooks[...], np.float64)
  x = np.random.default_rng(0).normal(size=(6, 4))
  tau = 0.3
  out = rq(jnp.asarray(x, jnp.float32), temperature=tau, soft=True)
  v, codes, codewords = x.copy(), [], []
  for level in range(3):
    d = ((v[:, None, :] - books[level][None]) ** 2).sum(-1)
    p = _softmax(-d / tau)
    q = p @ books[level]
    codes.append(p.argmax(-1))
    codewords.append(q)
    v = v - q  # the residual from the soft code
  np.testing.assert_allclose(out.codewords, np.stack(codewords, 1), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out.quantized, sum(codewords), rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(out.codes, np.stack(codes, 1))
  assert float(out.loss) == 0.0  # no VQ / commitment loss in soft mode
  # the gradient reaches every level's codebook through the soft residual chain
  grads = jax.grad(lambda b: (rq.__class__.__call__(
      _with_books(rq, b), jnp.asarray(x, jnp.float32), temperature=tau, soft=True)
      .quantized ** 2).sum())(rq.codebooks[...])
  assert all(np.abs(np.asarray(grads[level])).sum() > 0 for level in range(3))


def _with_books(rq, books):
  clone = nnx.clone(rq)
  clone.codebooks[...] = books
  return clone


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_uniformity_is_the_negative_entropy_of_average_usage(reduction):
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(7, 3, 5))
  p = _softmax(logits)
  per_level = [(p[:, l].mean(0) * np.log(p[:, l].mean(0) + 1e-10)).sum() for l in range(3)]
  want = np.sum(per_level) if reduction == "sum" else np.mean(per_level)
  got = codeword_uniformity(jnp.log(jnp.asarray(p, jnp.float32)), reduction)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  uniform = jnp.full((4, 3, 5), -np.log(5.0))
  np.testing.assert_allclose(codeword_uniformity(uniform, "sum"), -3 * np.log(5), rtol=1e-5)


def test_soft_argmax_equals_hard_argmin_at_a_small_temperature():
  cfg = RQVAEConfig(input_dim=8, hidden_dims=(16,), latent_dim=6, num_levels=3,
                    codebook_size=16, soft=True)
  soft = RQVAE(cfg, rngs=nnx.Rngs(0))
  soft.quantizer.init_kmeans(soft.encoder(jax.random.normal(jax.random.key(0), (300, 8))),
                             jax.random.key(1), iterations=5)
  hard = RQVAE(dataclasses.replace(cfg, soft=False), rngs=nnx.Rngs(0))
  nnx.update(hard, nnx.state(soft))
  x = np.asarray(jax.random.normal(jax.random.key(2), (300, 8)))
  np.testing.assert_array_equal(encode_items(soft, x, temperature=1e-5), encode_items(hard, x))
  assert (encode_items(soft, x, temperature=10.0) != encode_items(hard, x)).any()


def test_annealing_schedule_is_exact_at_its_end_points():
  cfg = TokenizerTrainConfig(length=3000, unit="epochs", temperature_start=0.01,
                             temperature_end=0.001)
  assert temperature_at(cfg, 0) == 0.01
  np.testing.assert_allclose(temperature_at(cfg, 1500), 0.0055)
  np.testing.assert_allclose(final_temperature(cfg), 0.01 - 0.009 * 2999 / 3000)  # official
  assert joint_temperature(0.001, 0.0, 7, 10) == 0.001  # official: fixed in the joint stage
  assert joint_temperature(0.001, 1e-4, 0, 10) == 0.001
  np.testing.assert_allclose(joint_temperature(0.001, 1e-4, 10, 10), 1e-4)


def test_pretraining_anneals_the_temperature_per_epoch():
  """The tokenizer sees temperature_at(unit) in every step of each unit: the soft loss of a
  frozen model (learning rate 0) at each unit's temperature, recomputed by hand."""
  x = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
  model_cfg = RQVAEConfig(input_dim=8, hidden_dims=(16,), latent_dim=4, num_levels=2,
                          codebook_size=8, soft=True, loss_reduction="mean",
                          uniformity_weight=1.0)
  cfg = TokenizerTrainConfig(length=4, unit="epochs", batch_size=16, learning_rate=0.0,
                             weight_decay=0.0, kmeans_iterations=3, temperature_start=1.0,
                             temperature_end=0.2, log_every=1)
  model, stats = train_tokenizer(model_cfg, cfg, x, seed=0)  # 4 steps per epoch
  # the last step (of epoch 3) ran at temperature_at(cfg, 3), not at a per-step value
  last = list(itertools.islice(item_batches(64, 16, 0), 16))[-1]
  _, parts = rqvae_losses(model, jnp.asarray(x[last]), temperature=temperature_at(cfg, 3))
  np.testing.assert_allclose(stats["final_losses"]["uniformity"], parts["uniformity"], rtol=1e-5)
  _, step_rate = rqvae_losses(model, jnp.asarray(x[last]), temperature=1.0 - 0.8 * 15 / 16)
  assert abs(float(step_rate["uniformity"]) - float(parts["uniformity"])) > 1e-4


def _tiny_model(num_items=10, levels=2, k=4, d_in=6, teacher_dim=8):
  tokenizer = RQVAE(RQVAEConfig(input_dim=d_in, hidden_dims=(12,), latent_dim=4,
                                num_levels=levels, codebook_size=k, soft=True,
                                detach_residual=False), rngs=nnx.Rngs(0))
  vocab = 1 + levels * k + 4
  t5 = T5Config(vocab_size=vocab, d_model=16, d_ff=32, num_heads=2, d_kv=8,
                num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.0)
  recommender = Recommender(t5, 4, teacher_dim, rngs=nnx.Rngs(1))
  codes = np.stack([np.arange(num_items) % k, np.arange(num_items) // k % k,
                    np.arange(num_items) // (k * k)], 1)
  offsets = np.array([1, 1 + k, 1 + 2 * k])
  model = UniGRec(tokenizer, recommender, codes + offsets, temperature=0.5)
  rng = np.random.default_rng(0)
  context = {"features": jnp.asarray(rng.normal(size=(num_items, d_in)), jnp.float32),
             "teacher": jnp.asarray(rng.normal(size=(num_items, teacher_dim)), jnp.float32)}
  batch = {"history": jnp.asarray([[1, 2, 3], [-1, 4, 5], [-1, -1, 7], [2, 3, 4]]),
           "target": jnp.asarray([4, 6, 8, 4]), "weight": jnp.asarray([1.0, 1, 1, 0]),
           "distill": jnp.ones(4)}
  return model, batch, context, JointConfig(code_offsets=(1, 1 + k))


def test_recommendation_loss_reaches_the_tokenizer_encoder_and_codebooks():
  model, batch, context, cfg = _tiny_model()
  rec_only = dataclasses.replace(cfg, recon_weight=0.0, token_weight=0.0,
                                 representation_weight=0.0)

  graphdef, tokenizer, rest = nnx.split(model, lambda path, _: path[0] == "tokenizer", ...)

  def loss(tokenizer_state):
    return unigrec_loss(nnx.merge(graphdef, tokenizer_state, rest), batch, None, context,
                        rec_only)[0]

  grads = jax.jit(jax.grad(loss))(tokenizer)["tokenizer"]  # compiled: eager took 28 s
  books = np.abs(np.asarray(grads["quantizer"]["codebooks"][...]))
  assert all(books[level].sum() > 0 for level in range(books.shape[0]))  # every level
  for layer in grads["encoder"]["layers"].values():
    assert np.abs(np.asarray(layer["kernel"][...])).sum() > 0
  decoder = jax.tree.leaves(grads["decoder"])  # the decoder is not on the recommendation path
  assert all(np.abs(np.asarray(g)).sum() == 0 for g in decoder)


def test_joint_objective_weights_its_parts_and_the_warm_up_switches_distillation():
  model, batch, context, cfg = _tiny_model()
  total, parts = unigrec_loss(model, batch, None, context, cfg)
  assert set(parts) == {"rec", "recon", "token_kl", "repr_nce"}
  want = (0.5 * parts["recon"] + parts["rec"] + 0.01 * parts["token_kl"]
          + 0.1 * parts["repr_nce"])
  np.testing.assert_allclose(total, want, rtol=1e-6)
  warm = {**batch, "distill": jnp.zeros(4)}
  total, parts = unigrec_loss(model, warm, None, context, cfg)
  np.testing.assert_allclose(total, 0.5 * parts["recon"] + parts["rec"], rtol=1e-6)
  # L_recon: half the mean over real history items plus half the mean over real targets
  temperature = model.assignment.temperature[...]

  def mse(items):
    x = context["features"][jnp.asarray(items)]
    return np.mean((np.asarray(x) - np.asarray(model.tokenizer(
        x, temperature=temperature).reconstruction)) ** 2, axis=-1)

  history = np.asarray(batch["history"])
  real = history[:3][history[:3] >= 0]  # row 3 is a filler row (weight 0): not counted
  want_recon = 0.5 * (mse(real).mean() + mse([4, 6, 8]).mean())
  np.testing.assert_allclose(parts["recon"], want_recon, rtol=1e-5)


def test_one_hot_soft_identifiers_give_the_token_path_exactly():
  cfg = T5Config(vocab_size=1 + 2 * 4, d_model=16, d_ff=32, num_heads=2, d_kv=8,
                 num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.0)
  model = T5(cfg, rngs=nnx.Rngs(0))
  history = jnp.asarray([[-1, 2, 0], [1, 3, 2]])
  codes = np.array([[0, 1], [2, 3], [1, 1], [3, 0]])
  probs = jax.nn.one_hot(codes[np.maximum(np.asarray(history), 0)], 4)  # [B, H, L, K]
  vectors, mask = soft_identifier_inputs(model, probs, history, (1, 5))
  tokens = np.where(np.asarray(history)[..., None] >= 0,
                    codes[np.maximum(np.asarray(history), 0)] + [1, 5], 0).reshape(2, -1)
  want, want_mask = model.encode(jnp.asarray(tokens))
  got, got_mask = model.encode(None, embeddings=vectors, mask=mask)
  np.testing.assert_array_equal(got_mask, want_mask)
  np.testing.assert_allclose(np.asarray(got)[np.asarray(mask)],
                             np.asarray(want)[np.asarray(want_mask)], rtol=1e-5, atol=1e-6)


def test_adapter_sizes_halve_to_the_latent():
  assert halving_dims(128, 32) == (128, 64, 32)
  assert halving_dims(256, 32) == (256, 128, 64, 32)
  assert halving_dims(64, 32) == (64, 32)


def test_missing_targets_never_count_at_cutoffs_beyond_a_short_ranking():
  ranked = np.array([[3, 4], [5, 6]])
  metrics = metrics_from_ranks(target_ranks(ranked, np.array([4, 9])), ks=(1, 2, 20))
  assert metrics["recall@20"] == 0.5 and metrics["recall@2"] == 0.5


def _tiny_run_config(directory):
  config = tiny_config(directory, method="unigrec")
  config.tokenizer.update(soft=True, temperature_start=0.5, temperature_end=0.1,
                          uniformity_weight=1e-3, detach_residual=False,
                          loss_reduction="mean", warmup_units=5, linear_decay=True,
                          grad_clip=1.0)
  config.grm.update(constrained=False, beam_size=20)
  config.unigrec.update(epochs=2, warmup_epochs=1, finetune_epochs=1, eval_every=1,
                        tokenizer_lr=1e-3, recommender_lr=1e-2, warmup_fraction=0.1)
  return config


def test_run_resumes_to_the_same_numbers_and_reports_collapse_statistics(tmp_path, monkeypatch):
  config = _tiny_run_config(str(tmp_path))
  reference = methods.run(config, str(tmp_path / "straight"))
  history = reference["joint"]["history"]
  assert len(history) == 2
  for record in history:  # identifier statistics after every joint epoch
    assert {"code_change", "collision_rate", "code_usage", "code_perplexity",
            "temperature"} <= set(record)
    assert len(record["code_perplexity"]) == 2
  assert all(h["temperature"] == pytest.approx(0.5 - 0.4 * 59 / 60) for h in history)
  for epoch, record in enumerate(history):  # distillation from epoch 1 (warmup_epochs=1)
    distill = 0.01 * record["token_kl"] + 0.1 * record["repr_nce"]
    want = record["rec"] + 0.5 * record["recon"] + (distill if epoch >= 1 else 0.0)
    assert record["loss"] == pytest.approx(want, rel=1e-5)
  assert any(h["code_change"] > 0 for h in history)  # the refreshed map is what resumes
  assert set(reference["metrics"]) >= {"test_constrained", "test_unconstrained", "valid"}
  assert reference["tokenizer"]["temperature"] == pytest.approx(0.5 - 0.4 * 59 / 60)

  resumed = interrupt_then_resume(
      monkeypatch, lambda: methods.run(config, str(tmp_path / "resumed")), "unigrec", epoch=0)
  strip = lambda hs: [{k: v for k, v in h.items() if k != "samples_per_s"} for h in hs]
  assert strip(resumed["joint"]["history"]) == strip(history)
  assert resumed["metrics"]["test_unconstrained"] == reference["metrics"]["test_unconstrained"]


def test_annealing_through_the_joint_stage_and_ablations_run_as_switches(tmp_path):
  config = _tiny_run_config(str(tmp_path))
  config.unigrec.update(epochs=2, finetune_epochs=0, joint_temperature_end=0.01,
                        token_weight=0.0)
  results = methods.run(config, str(tmp_path / "anneal"))
  start = 0.5 - 0.4 * 59 / 60
  temperatures = [h["temperature"] for h in results["joint"]["history"]]
  np.testing.assert_allclose(temperatures, [start + (0.01 - start) / 2, 0.01])
  assert "finetune_history" not in results
  assert all("token_kl" not in h and "repr_nce" in h for h in results["joint"]["history"])


@pytest.mark.parametrize("field, value, message", [
    ("unigrec.token_weight", -1.0, "unigrec.recon_weight, token_weight"),
    ("tokenizer.temperature_end", 0.0, "tokenizer.temperature_start"),
    ("unigrec.distill_logit_sign", "plus", "unigrec.distill_logit_sign"),
    ("tokenizer.soft", False, "tokenizer.soft=True"),
    ("tokenizer.selection", "min_collision",
     "tokenizer.selection='min_collision' with tokenizer.soft"),
    ("unigrec.finetune_patience", 0, "finetune_patience >= 1"),
])
def test_config_errors_name_the_field(tmp_path, field, value, message):
  config = _tiny_run_config(str(tmp_path))
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(ConfigError, match=message):
    check_config(config)
