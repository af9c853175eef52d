"""Qwen2 backbone, its checkpoint loader and LoRA adapters (DACT's LC-Rec backbone).

The fixtures in tests/fixtures/qwen2_* are tiny random checkpoints saved by `transformers` with
the logits it computed (tools/make_qwen2_fixture.py); CI needs no torch.
"""

import json
import re
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from genrec_jax.recommenders import hf_checkpoint, lora
from genrec_jax.recommenders.hf_checkpoint import load_qwen2, read_safetensors
from genrec_jax.recommenders.qwen2 import Qwen2, Qwen2Config, causal_mask, positions_from_mask
from genrec_jax.training.sharding import make_mesh
from genrec_jax.training.trainer import Trainer

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TINY = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                   num_heads=4, num_kv_heads=2, rope_theta=10000.0)


def _forward(model, tokens, mask):
  return np.asarray(nnx.jit(lambda m, t, k: m(t, k))(model, jnp.asarray(tokens),
                                                      jnp.asarray(mask)))


@pytest.mark.parametrize("name", ["qwen2_untied", "qwen2_tied_bf16"])
def test_logits_equal_transformers(name):
  """The loaded checkpoint gives the logits transformers computed, padded rows included."""
  directory = os.path.join(FIXTURES, name)
  model = load_qwen2(directory)
  ref = np.load(os.path.join(directory, "logits.npz"))
  out = _forward(model, ref["tokens"], ref["mask"])
  np.testing.assert_allclose(out[ref["mask"]], ref["logits"][ref["mask"]], atol=1e-4)
  np.testing.assert_array_equal(np.asarray(positions_from_mask(jnp.asarray(ref["mask"])))
                                [ref["mask"]], ref["positions"][ref["mask"]])
  assert model.cfg.tie_word_embeddings == (name == "qwen2_tied_bf16")


@pytest.mark.parametrize("param_dtype", ["bfloat16", "float32"])
def test_bfloat16_activations_close_to_float32(param_dtype):
  """bf16 activations (and weights) give the float32 logits to bf16 precision: measured
  max |error| 0.089 (bf16 weights) and 0.104 (float32 weights) on logits up to 3.9."""
  directory = os.path.join(FIXTURES, "qwen2_untied")
  ref = np.load(os.path.join(directory, "logits.npz"))
  exact = _forward(load_qwen2(directory), ref["tokens"], ref["mask"])
  model = load_qwen2(directory, dtype="bfloat16", param_dtype=param_dtype)
  assert model.layers[0].mlp.up_proj.kernel.dtype == jnp.dtype(param_dtype)
  out = _forward(model, ref["tokens"], ref["mask"])
  assert out.dtype == np.float32
  np.testing.assert_allclose(out[ref["mask"]], exact[ref["mask"]], atol=0.2)


def _write_safetensors(path, tensors):
  """A safetensors file of float32 arrays (the format `read_safetensors` reads)."""
  header, offset, blobs = {}, 0, []
  for name, value in tensors.items():
    data = np.ascontiguousarray(value, np.float32).tobytes()
    header[name] = {"dtype": "F32", "shape": list(value.shape),
                    "data_offsets": [offset, offset + len(data)]}
    offset += len(data)
    blobs.append(data)
  raw = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))


def _broken_checkpoint(tmp_path, edit):
  directory = tmp_path / "ckpt"
  shutil.copytree(os.path.join(FIXTURES, "qwen2_untied"), directory)
  tensors = {k: np.asarray(v, np.float32)
             for k, v in read_safetensors(str(directory / "model.safetensors")).items()}
  edit(tensors)
  _write_safetensors(str(directory / "model.safetensors"), tensors)
  return str(directory)


def test_writer_round_trip(tmp_path):
  """The test's writer makes a checkpoint the loader accepts (so the failures below come from
  the edits alone)."""
  directory = _broken_checkpoint(tmp_path, lambda t: None)
  ref = np.load(os.path.join(directory, "logits.npz"))
  out = _forward(load_qwen2(directory), ref["tokens"], ref["mask"])
  np.testing.assert_allclose(out[ref["mask"]], ref["logits"][ref["mask"]], atol=1e-4)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"),
     "lacks tensor model.layers.1.self_attn.k_proj.bias"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.weight": np.zeros((48, 31))}),
     "tensor model.layers.0.mlp.up_proj.weight has shape (48, 31)"),
    (lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.zeros((48, 32))}),
     "does not use, first model.layers.2.mlp.up_proj.weight"),
])
def test_wrong_checkpoint_names_the_tensor(tmp_path, edit, message):
  directory = _broken_checkpoint(tmp_path, edit)
  with pytest.raises(ValueError, match=re.escape(message)):
    load_qwen2(directory)


def test_tied_checkpoint_may_keep_an_equal_output_copy(tmp_path):
  directory = tmp_path / "tied"
  shutil.copytree(os.path.join(FIXTURES, "qwen2_tied_bf16"), directory)
  tensors = {k: np.asarray(v, np.float32)
             for k, v in read_safetensors(str(directory / "model.safetensors")).items()}
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
  _write_safetensors(str(directory / "model.safetensors"), tensors)
  load_qwen2(str(directory))
  tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1.0
  _write_safetensors(str(directory / "model.safetensors"), tensors)
  with pytest.raises(ValueError, match="lm_head.weight that differs"):
    load_qwen2(str(directory))


def test_wrong_config_and_files(tmp_path):
  directory = tmp_path / "ckpt"
  shutil.copytree(os.path.join(FIXTURES, "qwen2_untied"), directory)
  config = json.loads((directory / "config.json").read_text())
  (directory / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
  with pytest.raises(ValueError, match="model_type 'llama'"):
    load_qwen2(str(directory))
  (directory / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_qwen2(str(directory))
  path = directory / "model.safetensors"
  header = int.from_bytes(path.read_bytes()[:8], "little")
  for size in (8 + header + 100, 500):  # inside the data, inside the header
    with open(path, "r+b") as f:
      f.truncate(size)
    with pytest.raises(ValueError, match="truncated"):
      read_safetensors(str(path))


def test_hf_names():
  assert hf_checkpoint.hf_name(("layers", 3, "self_attn", "q_proj", "kernel")) == (
      "model.layers.3.self_attn.q_proj.weight", True)
  assert hf_checkpoint.hf_name(("norm", "scale")) == ("model.norm.weight", False)
  assert hf_checkpoint.hf_name(("lm_head", "kernel")) == ("lm_head.weight", True)
  assert hf_checkpoint.hf_name(("embed_tokens", "embedding")) == (
      "model.embed_tokens.weight", False)


def test_cached_decoding_equals_full_forward():
  """Prefill, then one token at a time through the key/value cache, gives the logits of the
  full causal forward pass at every position (rows with padding included)."""
  model = Qwen2(TINY, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(1, 64, (3, 9)))
  mask = np.ones((3, 9), bool)
  mask[1, :3] = False
  mask[2, 2] = False
  mask = jnp.asarray(mask)
  full = _forward(model, tokens, mask)

  @nnx.jit
  def incremental(model, tokens, mask):
    h, cache = model.states(model.embed_tokens(tokens[:, :5]), positions_from_mask(mask[:, :5]),
                            causal_mask(mask[:, :5]))
    out = [model.logits(h)]
    for i in range(5, 9):
      past = mask[:, :i]
      h, cache = model.states(model.embed_tokens(tokens[:, i:i + 1]),
                              positions_from_mask(mask[:, i:i + 1], past.sum(1)),
                              causal_mask(mask[:, i:i + 1], past), cache)
      out.append(model.logits(h))
    return jnp.concatenate(out, axis=1)

  step = np.asarray(incremental(model, tokens, mask))
  np.testing.assert_allclose(step[np.asarray(mask)], full[np.asarray(mask)], atol=1e-5)


def test_lora_starts_neutral_and_trains_adapters_only():
  """A fresh adapter leaves the logits unchanged; training the LoRAParam group changes the
  adapters and the outputs and leaves every base weight bit-identical; the merged kernel
  reproduces the wrapped layer."""
  model = Qwen2(TINY, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(1).integers(1, 64, (4, 7)))
  before = _forward(model, tokens, jnp.ones(tokens.shape, bool))
  base = jax.tree.map(np.array, nnx.state(model, nnx.Param))
  cfg = lora.LoRAConfig(rank=4, alpha=8.0, dropout=0.1)
  assert lora.apply_lora(model, cfg, nnx.Rngs(1)) == 2 * 7
  np.testing.assert_allclose(_forward(model, tokens, jnp.ones(tokens.shape, bool)), before,
                             atol=1e-6)

  def loss_fn(m, batch, key, context):
    mask = jnp.ones(batch["tokens"].shape, bool)
    h, _ = m.states(m.embed_tokens(batch["tokens"]), positions_from_mask(mask),
                    causal_mask(mask), key=key)
    logits = m.logits(h)[:, :-1]
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["tokens"][:, 1:]).mean(), {}

  not_lora = nnx.All(nnx.Param, nnx.Not(lora.LoRAParam))
  trainer = Trainer(model, loss_fn, {"adapters": optax.adam(1e-2), "base": optax.adam(1e-2)},
                    make_mesh(), filters={"adapters": lora.LoRAParam, "base": ...})
  params = trainer.init_params
  opt = trainer.init_opt_state(params)
  for i in range(3):
    params, opt, metrics = trainer.train_step(params, opt, {"tokens": tokens},
                                              jax.random.key(i), trainable=("adapters",))
  trained = trainer.merge(params)
  for (path, old), new in zip(jax.tree_util.tree_flatten_with_path(base)[0],
                              jax.tree.leaves(nnx.state(trained, not_lora)), strict=True):
    np.testing.assert_array_equal(np.asarray(new), old, err_msg=str(path))
  assert not np.allclose(_forward(trained, tokens, jnp.ones(tokens.shape, bool)), before,
                         atol=1e-4)
  layer = trained.layers[1].mlp.gate_proj
  x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 32)), jnp.float32)
  np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(x @ layer.merged_kernel()),
                             atol=1e-5)


def test_lsat_merge_and_peso_penalty_equal_numpy():
  rng = np.random.default_rng(0)
  shapes = [(5, 2), (2, 3), (4, 2), (2, 4)]  # two layers' A and B
  new = [rng.normal(size=s).astype(np.float32) for s in shapes]
  old = [rng.normal(size=s).astype(np.float32) for s in shapes]
  tree = lambda leaves: {"l0": {"lora_a": leaves[0], "lora_b": leaves[1]},
                         "l1": {"lora_a": leaves[2], "lora_b": leaves[3]}}
  merged = lora.merge_adapters(tree(new), tree(old), 0.3)
  np.testing.assert_allclose(merged["l1"]["lora_a"], 0.3 * new[2] + 0.7 * old[2], rtol=1e-6)

  def kl(p, q):
    p = np.exp(p.ravel() - p.max()) / np.exp(p.ravel() - p.max()).sum()
    q = np.exp(q.ravel() - q.max()) / np.exp(q.ravel() - q.max()).sum()
    return float(np.sum(p * np.log(p / q)))

  expected = (kl(new[0], old[0]) + kl(new[1], old[1]) + kl(new[2], old[2])
              + kl(new[3], old[3])) / 2
  np.testing.assert_allclose(float(lora.proximal_kl(tree(new), tree(old))), expected,
                             rtol=1e-5)
  assert float(lora.proximal_kl(tree(new), tree(new))) == pytest.approx(0.0, abs=1e-6)
