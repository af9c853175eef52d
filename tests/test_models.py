"""Model invariants that length bucketing relies on, and SASRec causality."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from genrec_jax.recommenders.sasrec import SASRec, SASRecConfig
from genrec_jax.recommenders.t5 import T5, T5Config, relative_position_bucket


def test_t5_logits_do_not_depend_on_left_padding():
  model = T5(T5Config(vocab_size=50, d_model=16, d_ff=32, num_heads=2, d_kv=8,
                      num_encoder_layers=2, num_decoder_layers=2), rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, 50, (3, 8)))
  decoder = jnp.asarray([[0, 5, 7], [0, 1, 2], [0, 9, 9]])
  short = model(tokens, decoder)
  padded = model(jnp.pad(tokens, ((0, 0), (12, 0))), decoder)
  np.testing.assert_allclose(np.asarray(short), np.asarray(padded), atol=1e-5)


def test_t5_dropout_is_keyed_and_off_without_key():
  model = T5(T5Config(vocab_size=20, d_model=16, d_ff=32, num_heads=2, d_kv=8,
                      num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.5),
             rngs=nnx.Rngs(0))
  tokens, decoder = jnp.ones((2, 4), jnp.int32), jnp.zeros((2, 2), jnp.int32)
  a = model(tokens, decoder, jax.random.key(1))
  b = model(tokens, decoder, jax.random.key(1))
  c = model(tokens, decoder, jax.random.key(2))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))
  np.testing.assert_array_equal(np.asarray(model(tokens, decoder)),
                                np.asarray(model(tokens, decoder)))


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
  h = model(seq)
  changed = model(seq.at[:, -1].set(9))
  np.testing.assert_allclose(np.asarray(h[:, :-1]), np.asarray(changed[:, :-1]), atol=1e-5)
  padded = model(jnp.pad(seq, ((0, 0), (6, 0))))
  np.testing.assert_allclose(np.asarray(h[:, -1]), np.asarray(padded[:, -1]), atol=1e-5)
  assert model.logits(h).shape == (2, 6, 30)
