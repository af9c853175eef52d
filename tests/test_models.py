"""Model invariants that length bucketing relies on, and SASRec causality."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from genrec_jax.recommenders.sasrec import SASRec, SASRecConfig
from genrec_jax.recommenders.t5 import T5, T5Config, dropout, linear, relative_position_bucket

# Models run compiled: one program per call instead of hundreds of op-by-op dispatches (the
# eager forms took 10-30 s per test on two cores).
forward = nnx.jit(lambda model, *args: model(*args))


def test_t5_logits_do_not_depend_on_left_padding():
  model = T5(T5Config(vocab_size=50, d_model=16, d_ff=32, num_heads=2, d_kv=8,
                      num_encoder_layers=2, num_decoder_layers=2), rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, 50, (3, 8)))
  decoder = jnp.asarray([[0, 5, 7], [0, 1, 2], [0, 9, 9]])
  short = forward(model, tokens, decoder)
  padded = forward(model, jnp.pad(tokens, ((0, 0), (12, 0))), decoder)
  np.testing.assert_allclose(np.asarray(short), np.asarray(padded), atol=1e-5)


def test_t5_dropout_is_keyed_and_off_without_key():
  model = T5(T5Config(vocab_size=20, d_model=16, d_ff=32, num_heads=2, d_kv=8,
                      num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.5),
             rngs=nnx.Rngs(0))
  tokens, decoder = jnp.ones((2, 4), jnp.int32), jnp.zeros((2, 2), jnp.int32)
  a = forward(model, tokens, decoder, jax.random.key(1))
  b = forward(model, tokens, decoder, jax.random.key(1))
  c = forward(model, tokens, decoder, jax.random.key(2))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))
  np.testing.assert_array_equal(np.asarray(forward(model, tokens, decoder)),
                                np.asarray(forward(model, tokens, decoder)))


def test_dropout_mask_keep_rate_scale_and_independence():
  x = jnp.ones((64, 80, 256), jnp.float32)
  a, b = dropout(x, 0.1, jax.random.key(1)), dropout(x, 0.1, jax.random.key(2))
  ka, kb = np.asarray(a > 0, np.float64).ravel(), np.asarray(b > 0, np.float64).ravel()
  n = ka.size  # 1.3 M draws: the keep rate's standard error is 2.6e-4
  assert abs(ka.mean() - 0.9) < 5 * np.sqrt(0.09 / n)
  np.testing.assert_allclose(np.asarray(a)[np.asarray(a) > 0], 1 / 0.9, rtol=1e-6)
  assert abs(float(np.asarray(a).mean()) - 1.0) < 5 * np.sqrt(0.09 / n) / 0.9
  # Masks of two keys, and neighbouring elements of one mask, are uncorrelated.
  assert abs(np.corrcoef(ka, kb)[0, 1]) < 5 / np.sqrt(n)
  assert abs(np.corrcoef(ka[:-1], ka[1:])[0, 1]) < 5 / np.sqrt(n)
  assert abs(np.corrcoef(ka[:-256], ka[256:])[0, 1]) < 5 / np.sqrt(n)
  np.testing.assert_array_equal(np.asarray(dropout(x, 0.1, None)), np.asarray(x))


def test_incremental_decoding_with_cache_equals_full_decoder():
  model = T5(T5Config(vocab_size=30, d_model=16, d_ff=32, num_heads=2, d_kv=8,
                      num_encoder_layers=1, num_decoder_layers=3), rngs=nnx.Rngs(4))
  rng = np.random.default_rng(3)
  tokens = jnp.asarray(rng.integers(0, 30, (2, 7)))
  prefix = jnp.asarray(rng.integers(1, 30, (6, 5))).at[:, 0].set(0)  # 3 rows per example
  encoded, mask = nnx.jit(lambda m, t: m.encode(t))(model, tokens)
  full = nnx.jit(lambda m, *a: m.decode(*a))(model, encoded, mask, prefix)  # [6, 5, V]
  memory = nnx.jit(lambda m, e: m.decoder_memory(e))(model, encoded)
  cache = model.init_cache(6)
  step = nnx.jit(lambda m, *a: m.decode_step(*a))
  logits, cache = step(model, memory, mask, prefix[:, :2], cache)  # two positions at once
  np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, 1]), atol=1e-5)
  for pos in range(2, 5):
    logits, cache = step(model, memory, mask, prefix[:, pos:pos + 1], cache)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, pos]), atol=1e-5)
  assert cache[0][0].shape == (6, 5, 2, 8)


def test_linear_gradients_equal_numpy_matmul_gradients():
  # Both branches of the CPU backward pass (narrow input / narrow output), 2-D and 3-D inputs;
  # the reference is the hand-derived gradient of sum(cot * (x @ w)) in float64 NumPy.
  rng = np.random.default_rng(0)
  for x_shape, d_out in [((6, 5, 3), 7), ((11, 7), 3)]:
    x = rng.normal(size=x_shape).astype(np.float32)
    w = rng.normal(size=(x_shape[-1], d_out)).astype(np.float32)
    cot = rng.normal(size=x_shape[:-1] + (d_out,)).astype(np.float32)
    y, grads = jax.value_and_grad(lambda x, w, c=cot: jnp.sum(linear(x, w) * c),
                                  argnums=(0, 1))(x, w)
    x64, w64, cot64 = (a.astype(np.float64) for a in (x, w, cot))
    np.testing.assert_allclose(y, np.sum(cot64 * (x64 @ w64)), rtol=1e-5)
    np.testing.assert_allclose(grads[0], cot64 @ w64.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads[1], x64.reshape(-1, x.shape[-1]).T @ cot64.reshape(-1, d_out),
                               rtol=1e-5, atol=1e-5)


def test_bf16_matmuls_round_inputs_and_keep_float32_parameters_and_outputs():
  # The reference: NumPy float64 matmuls of the inputs rounded to bf16 (what the matrix units
  # see); float32 accumulation leaves only float32 summation error.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 5, 16)).astype(np.float32)
  w = rng.normal(size=(16, 8)).astype(np.float32)
  rounded = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32), np.float64)
  y = linear(x, w, "bfloat16")
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y), rounded(x) @ rounded(w), rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(y) - x.astype(np.float64) @ w).max() > 1e-3  # bf16 really used
  cfg = dict(vocab_size=50, d_model=16, d_ff=32, num_heads=2, d_kv=8, num_encoder_layers=1,
             num_decoder_layers=1, dropout_rate=0.0)
  full = T5(T5Config(**cfg), rngs=nnx.Rngs(0))
  mixed = T5(T5Config(**cfg, matmul_dtype="bfloat16"), rngs=nnx.Rngs(0))
  tokens = jnp.asarray(rng.integers(1, 50, (3, 6)))
  decoder = jnp.asarray([[0, 5, 7], [0, 1, 2], [0, 9, 9]])
  a, b = np.asarray(forward(full, tokens, decoder)), np.asarray(forward(mixed, tokens, decoder))
  assert b.dtype == np.float32 and np.abs(a - b).max() < 0.05 * np.abs(a).max()

  def loss(model):
    return jnp.mean(jax.nn.log_softmax(model(tokens, decoder))[..., 3])
  grads = nnx.jit(nnx.grad(loss))(mixed)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(nnx.state(grads)))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(mixed, nnx.Param)))


def test_relative_position_buckets_match_t5_reference_values():
  # Values of HF T5's _relative_position_bucket(bidirectional=True, 32 buckets, 128 max).
  rel = jnp.asarray([-200, -20, -3, -1, 0, 1, 3, 20, 200])
  got = relative_position_bucket(rel, True, 32, 128)
  assert np.asarray(got).tolist() == [15, 10, 3, 1, 0, 17, 19, 26, 31]
  causal = relative_position_bucket(rel, False, 32, 128)
  # n = 20 >= 16 exact buckets: 16 + floor(ln(20/16) / ln(128/16) * 16) = 17.
  assert np.asarray(causal).tolist() == [31, 17, 3, 1, 0, 0, 0, 0, 0]


def test_sasrec_is_causal_and_padding_invariant():
  model = SASRec(SASRecConfig(num_items=30, hidden_dim=16, num_layers=2, num_heads=2,
                              max_len=12), rngs=nnx.Rngs(0))
  seq = jnp.asarray([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])
  h = forward(model, seq)
  changed = forward(model, seq.at[:, -1].set(9))
  np.testing.assert_allclose(np.asarray(h[:, :-1]), np.asarray(changed[:, :-1]), atol=1e-5)
  padded = forward(model, jnp.pad(seq, ((0, 0), (6, 0))))
  np.testing.assert_allclose(np.asarray(h[:, -1]), np.asarray(padded[:, -1]), atol=1e-5)
  assert model.logits(h).shape == (2, 6, 30)


def test_grm_loss_averages_token_cross_entropy_over_tokens_and_real_samples():
  """Reference: token-level CE averaged over the D target tokens (the DACT / TIGER code);
  "sum" keeps the earlier per-sample sum; padded samples (weight 0) do not count. Batches
  carry item indices, turned into tokens inside the loss through the identifier map."""
  from genrec_jax.training.grm import grm_loss
  model = T5(T5Config(vocab_size=30, d_model=16, d_ff=32, num_heads=2, d_kv=8,
                      num_encoder_layers=1, num_decoder_layers=1), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  item_tokens = rng.integers(1, 30, (7, 3)).astype(np.int32)  # 7 items, D = 3
  history = np.array([[-1, 2], [4, 5], [0, 6], [3, 1]], np.int32)
  target = np.array([1, 3, 6, -1], np.int32)
  batch = {"history": jnp.asarray(history), "target": jnp.asarray(target),
           "weight": jnp.asarray([1.0, 1.0, 1.0, 0.0])}
  context = {"item_tokens": jnp.asarray(item_tokens)}
  inputs = np.where(history[..., None] >= 0, item_tokens[np.maximum(history, 0)], 0)
  targets = item_tokens[np.maximum(target, 0)]
  logits = np.asarray(model(jnp.asarray(inputs.reshape(4, 6)),
                            jnp.pad(jnp.asarray(targets[:, :-1]), ((0, 0), (1, 0)))),
                      np.float64)
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  nll = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]  # [4, 3]
  loss, aux = grm_loss(model, batch, None, context)
  assert aux == {}
  np.testing.assert_allclose(float(loss), nll[:3].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(grm_loss(model, batch, None, context, "sum")[0]),
                             nll[:3].sum(-1).mean(), rtol=1e-5)


def test_grm_optimizer_defaults_to_constant_adamw_without_clipping():
  import optax
  from genrec_jax.training.grm import GRMTrainConfig
  from genrec_jax.training.optim import make_optimizer
  cfg = GRMTrainConfig()
  assert (cfg.warmup_steps, cfg.grad_clip, cfg.loss_reduction) == (0, 0.0, "mean")
  params = {"w": jnp.ones((3,))}
  grads = {"w": jnp.asarray([100.0, -50.0, 3.0])}  # norm >> 1: clipping would show
  ours = make_optimizer(1e-3, 0.01, cfg.warmup_steps, cfg.grad_clip)
  plain = optax.adamw(1e-3, weight_decay=0.01)
  s1, s2 = ours.init(params), plain.init(params)
  for _ in range(3):
    u1, s1 = ours.update(grads, s1, params)
    u2, s2 = plain.update(grads, s2, params)
    np.testing.assert_allclose(np.asarray(u1["w"]), np.asarray(u2["w"]), rtol=1e-6)
  clipped = make_optimizer(1e-3, 0.01, 10, 1.0)
  u3, _ = clipped.update(grads, clipped.init(params), params)
  assert np.abs(np.asarray(u3["w"])).max() < np.abs(np.asarray(u2["w"])).max() / 5


def test_t5_encoder_reads_input_vectors_and_soft_tokens():
  """Embedding inputs: the token table's rows give the token path's states exactly; a soft
  token is the probability-weighted mix of a level's rows, and gradients reach the inputs."""
  model = T5(T5Config(vocab_size=1 + 2 * 5, d_model=16, d_ff=32, num_heads=2, d_kv=8,
                      num_encoder_layers=1, num_decoder_layers=1), rngs=nnx.Rngs(0))
  tokens = jnp.asarray([[0, 0, 3, 8], [2, 7, 4, 9]], jnp.int32)  # level 1: 1..5, level 2: 6..10
  table = np.asarray(model.embed.embedding[...])
  states, mask = model.encode(tokens)
  vectors = jnp.asarray(table[np.asarray(tokens)])
  from_vectors, same_mask = model.encode(None, embeddings=vectors, mask=tokens > 0)
  np.testing.assert_array_equal(np.asarray(mask), np.asarray(same_mask))
  np.testing.assert_allclose(np.asarray(from_vectors), np.asarray(states), atol=1e-6)
  probs = np.random.default_rng(0).dirichlet(np.ones(5), size=(2, 4)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(model.soft_embeddings(jnp.asarray(probs), 6)),
                             probs @ table[6:11], rtol=1e-5, atol=1e-6)
  one_hot = jnp.asarray(np.eye(5, dtype=np.float32)[[2, 4]])  # codes 2, 4 of level 1
  np.testing.assert_allclose(np.asarray(model.soft_embeddings(one_hot, 1)), table[[3, 5]],
                             atol=1e-6)

  def real_states_sum(p):
    encoded, real = model.encode(None, embeddings=model.soft_embeddings(p, 1), mask=tokens > 0)
    return jnp.where(real[..., None], encoded, 0.0).sum()
  grad = np.asarray(jax.jit(jax.grad(real_states_sum))(jnp.asarray(probs)))
  assert (np.abs(grad[1]).max(-1) > 0).all()  # every input of the unpadded row is read
  np.testing.assert_array_equal(grad[0, :2], 0.0)  # padded inputs reach no real state
