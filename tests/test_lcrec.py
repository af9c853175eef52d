"""LC-Rec recommender: prompts, response loss, ranking, frozen base (DACT's LC-Rec backbone)."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from genrec_jax.data.splits import SampleSet
from genrec_jax.recommenders import lora
from genrec_jax.recommenders.lcrec import LCRec, PromptTokens, word_prompt_tokens
from genrec_jax.recommenders.qwen2 import Qwen2, Qwen2Config
from genrec_jax.tokenizers.identifiers import IdentifierTable
from genrec_jax.training import lcrec
from genrec_jax.training.grm import GRMTrainConfig
from genrec_jax.training.loop import LoopConfig
from genrec_jax.training.sharding import make_mesh
from tests.conftest import TEST_XLA_FLAGS

BACKBONE = Qwen2Config(vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=2,
                       num_heads=4, num_kv_heads=2, rope_theta=10000.0, initializer_range=0.3)
PROMPT = PromptTokens(prefix=(5, 6, 7), separator=(8,), suffix=(9, 10), eos=39)
# 6 items, 2 levels of 3 codes + a dedup digit of 2.
CODES = np.array([[0, 1, 0], [2, 0, 0], [1, 1, 0], [2, 2, 0], [0, 1, 1], [1, 0, 0]], np.int32)
TABLE = IdentifierTable(CODES, np.arange(6, dtype=np.int32), (3, 3, 2))


def _model(seed=0):
  model = LCRec(Qwen2(BACKBONE, rngs=nnx.Rngs(seed)), TABLE.vocab_size - 1,
                lora.LoRAConfig(rank=2, alpha=4.0, dropout=0.0), rngs=nnx.Rngs(seed + 1))
  # Non-zero adapters, so that the tests see them act.
  for _, var in nnx.iter_graph(model):
    if isinstance(var, lora.LoRAParam):
      var[...] = 0.3 * jax.random.normal(jax.random.key(seed + 7), var.shape)
  return model


def _item_tokens():
  return jnp.asarray(TABLE.item_tokens(6))


def _unpadded_prompt(history, item_tokens):
  """The prompt of one history, in Python: LLM token ids."""
  shift = BACKBONE.vocab_size - 1
  out = list(PROMPT.prefix)
  for n, item in enumerate(i for i in history if i >= 0):
    out += (list(PROMPT.separator) if n else []) + [int(t) + shift for t in item_tokens[item]]
  return out + list(PROMPT.suffix)


def test_prompt_rows_equal_their_unpadded_prompts():
  history = jnp.array([[-1, -1, 3], [1, 4, 2], [-1, 5, 0], [2, -1, 4]])
  item_tokens = _item_tokens()
  tokens, mask = lcrec.prompt_inputs(
      history, lcrec.llm_item_tokens(item_tokens, BACKBONE.vocab_size), PROMPT)
  assert tokens.shape == (4, 3 + 3 * (1 + 3) + 2)
  for row in range(4):
    expected = _unpadded_prompt(np.asarray(history[row]), np.asarray(item_tokens))
    assert np.asarray(tokens[row])[np.asarray(mask[row])].tolist() == expected


@nnx.jit
def _unpadded_logp(model, seq):
  """Log-probabilities [T, V] after each token of one unpadded sequence int [1, T]."""
  from genrec_jax.recommenders.qwen2 import causal_mask, positions_from_mask
  mask = jnp.ones(seq.shape, bool)
  h, _ = model.states(seq, positions_from_mask(mask), causal_mask(mask))
  return jax.nn.log_softmax(model.logits(h[0]), -1)


def _sequence_logp(model, prompt, continuation):
  """log p(continuation | prompt) token by token, from one unpadded forward pass."""
  logp = np.asarray(_unpadded_logp(model, jnp.asarray([prompt + continuation[:-1]])))
  return np.array([logp[len(prompt) - 1 + i, t] for i, t in enumerate(continuation)])


# Compiled once per shape: run eagerly, every primitive would compile on its own.
_loss = nnx.jit(functools.partial(lcrec.lcrec_loss, prompt=PROMPT))


def test_loss_is_the_response_cross_entropy():
  model = _model()
  batch = {"history": jnp.array([[-1, 1, 3], [2, 4, 5], [0, -1, -1]]),
           "target": jnp.array([2, 0, -1]), "weight": jnp.array([1.0, 1.0, 0.0])}
  item_tokens = _item_tokens()
  loss, aux = _loss(model, batch, None, {"item_tokens": item_tokens})
  shift = BACKBONE.vocab_size - 1
  expected = []
  for row in range(2):
    history = np.asarray(batch["history"][row])
    target = [int(t) + shift for t in np.asarray(item_tokens)[int(batch["target"][row])]]
    logp = _sequence_logp(model, _unpadded_prompt(history, np.asarray(item_tokens)),
                          target + [PROMPT.eos])
    expected.append(-logp.mean())
  np.testing.assert_allclose(float(loss), np.mean(expected), rtol=1e-5)
  assert aux == {}

  previous = jax.tree.map(lambda x: x * 0.5, nnx.state(model, lora.LoRAParam))
  context = {"item_tokens": item_tokens, "previous_adapters": previous,
             "proximal_weight": jnp.float32(2.0)}
  peso, aux = _loss(model, batch, None, context)
  penalty = lora.proximal_kl(nnx.state(model, lora.LoRAParam), previous)
  np.testing.assert_allclose(float(peso), float(loss) + 2.0 * float(penalty), rtol=1e-5)
  assert float(aux["proximal"]) > 0


@pytest.mark.parametrize("weights", [(1.0,), (0.5, 0.5)])
def test_ranking_equals_brute_force_over_the_catalog(weights):
  """With a beam that holds every prefix, the constrained search returns every item in the
  order of its identifier's log-probability after the prompt (brute force over the table);
  with two models (LSAT's score averaging), of the weighted sum of theirs."""
  from genrec_jax.decoding.trie import search_trie, trie_capacity
  models = tuple(_model(3 + 2 * i) for i in range(len(weights)))
  history = jnp.array([[-1, 1, 3], [2, 4, 5]])
  item_tokens = _item_tokens()
  trie = jax.tree.map(jnp.asarray, search_trie(TABLE, trie_capacity(TABLE.level_sizes, 6)))
  rank = nnx.jit(functools.partial(
      lcrec.lcrec_rank, weights=weights, prompt=PROMPT,
      offsets=tuple(int(o) for o in TABLE.offsets), level_sizes=tuple(TABLE.level_sizes),
      beam_size=8, constrained=True, level_softmax=False))
  items, scores = rank(models, history=history, item_tokens=item_tokens, trie=trie)
  shift = BACKBONE.vocab_size - 1
  for row in range(2):
    prompt = _unpadded_prompt(np.asarray(history[row]), np.asarray(item_tokens))
    brute = [sum(w * float(_sequence_logp(m, prompt, [int(t) + shift for t in
                                                      np.asarray(item_tokens)[i]]).sum())
                 for m, w in zip(models, weights)) for i in range(6)]
    order = np.argsort(brute)[::-1]
    assert np.asarray(items[row])[:6].tolist() == order.tolist()
    np.testing.assert_allclose(np.asarray(scores[row])[:6], np.sort(brute)[::-1], atol=1e-4)


def _samples(n, seed):
  rng = np.random.default_rng(seed)
  history = rng.integers(0, 6, (n, 4)).astype(np.int32)
  lengths = rng.integers(1, 5, n)
  history[np.arange(4)[None] < (4 - lengths)[:, None]] = -1
  return SampleSet(history, rng.integers(0, 6, n).astype(np.int32),
                   np.arange(n, dtype=np.int32))


def test_trainer_fits_adapters_and_identifier_rows_only(tmp_path):
  cfg = GRMTrainConfig(learning_rate=1e-2, batch_size=8, eval_batch_size=8, beam_size=4,
                       length_buckets=(4,), loop=LoopConfig(epochs=2, patience=5))
  trainer = lcrec.LCRecTrainer(Qwen2(BACKBONE, rngs=nnx.Rngs(0)), TABLE.vocab_size - 1,
                               PROMPT, lora.LoRAConfig(rank=2, alpha=4.0), cfg, make_mesh())
  start = jax.tree.map(np.array, trainer.init_params)
  params, state = trainer.train(TABLE, 6, _samples(32, 0), _samples(8, 1), str(tmp_path))
  changed = {group: [not np.array_equal(a, np.asarray(b)) for a, b in
                     zip(jax.tree.leaves(start[group]), jax.tree.leaves(params[group]),
                         strict=True)]
             for group in (lcrec.ADAPTERS, lcrec.ROWS, lcrec.BACKBONE)}
  assert all(changed[lcrec.ADAPTERS]) and all(changed[lcrec.ROWS])
  assert not any(changed[lcrec.BACKBONE])
  ranked = trainer.rank(params, TABLE, 6, _samples(8, 2))
  assert ranked.shape == (8, 4) and (ranked >= 0).all()
  assert all(len(set(r)) == 4 for r in ranked.tolist())
  adapters = trainer.adapters(params)
  swapped = trainer.with_adapters(params, jax.tree.map(jnp.zeros_like, adapters))
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(trainer.adapters(swapped)))
  np.testing.assert_array_equal(
      np.asarray(jax.tree.leaves(swapped[lcrec.BACKBONE])[0]),
      np.asarray(jax.tree.leaves(params[lcrec.BACKBONE])[0]))


@pytest.mark.parametrize("learning_rate", [1e-2, 0.0])
def test_resume_with_the_frozen_backbone_left_out_of_checkpoints(tmp_path, monkeypatch,
                                                                 learning_rate):
  """An interrupted fit resumes to the numbers of an uninterrupted one, and its checkpoints
  hold the trained groups only (the frozen backbone comes from the starting parameters).
  With a zero learning rate no later epoch improves on the restored best, whose backbone
  must outlive the resumed steps (which donate the parameters)."""
  from genrec_jax.training.checkpoint import Checkpoints
  from tests.conftest import interrupt_then_resume
  cfg = GRMTrainConfig(learning_rate=learning_rate, batch_size=8, eval_batch_size=8,
                       beam_size=4, length_buckets=(4,), loop=LoopConfig(epochs=2, patience=5))
  trainer = lcrec.LCRecTrainer(Qwen2(BACKBONE, rngs=nnx.Rngs(0)), TABLE.vocab_size - 1,
                               PROMPT, lora.LoRAConfig(rank=2, alpha=4.0), cfg, make_mesh())
  start = trainer.with_adapters(trainer.init_params, trainer.adapters(trainer.init_params))

  def run(directory):
    return trainer.train(TABLE, 6, _samples(32, 0), _samples(8, 1), str(directory),
                         params=start)

  straight, state = run(tmp_path / "straight")
  resumed, resumed_state = interrupt_then_resume(monkeypatch, lambda: run(tmp_path / "cut"),
                                                 "grm", epoch=0)
  assert [h["loss"] for h in resumed_state["history"]] == [h["loss"] for h in
                                                           state["history"]]
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  stored = Checkpoints(str(tmp_path / "cut"), ("params", "opt_state", "best_params"))
  for step in stored.manager.all_steps():  # the last holds the best parameters only
    metadata = stored.manager.item_metadata(step)
    assert "best_params" in stored.stored_items(step)
    for item in set(stored.stored_items(step)) & {"params", "best_params"}:
      assert set(metadata[item]) == set(lcrec.FINE_TUNED), (step, item)
  stored.close()


def test_word_prompt_stays_inside_the_base_vocabulary():
  prompt = word_prompt_tokens(40)
  ids = prompt.prefix + prompt.separator + prompt.suffix
  assert min(ids) >= 1 and max(ids) <= 38 and prompt.eos == 39
  # One token per word or punctuation run: "...with items " ends in a lone space.
  assert len(prompt.prefix) == 30 and len(prompt.separator) == 2 and len(prompt.suffix) == 21
  assert word_prompt_tokens(40) == prompt
  short = word_prompt_tokens(40, "identifiers")
  assert (len(short.prefix), short.separator, len(short.suffix)) == (2, (), 2)
  with pytest.raises(ValueError, match="unknown prompt 'chat'"):
    word_prompt_tokens(40, "chat")
  with pytest.raises(ValueError, match="cannot hold"):
    word_prompt_tokens(3)


_FSDP = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from genrec_jax.training.sharding import make_mesh, replicate, shard_batch, use_cpu_devices
use_cpu_devices(int(sys.argv[1]))
from genrec_jax.recommenders import lora
from genrec_jax.recommenders.lcrec import word_prompt_tokens
from genrec_jax.recommenders.qwen2 import Qwen2, Qwen2Config
from genrec_jax.training import lcrec
from genrec_jax.training.grm import GRMTrainConfig
from tests.test_lcrec import TABLE
cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=256, num_layers=2,
                  num_heads=4, num_kv_heads=2, rope_theta=10000.0)
mesh = make_mesh()
trainer = lcrec.LCRecTrainer(Qwen2(cfg, rngs=nnx.Rngs(0)), TABLE.vocab_size - 1,
                             word_prompt_tokens(256), lora.LoRAConfig(), GRMTrainConfig(
                                 learning_rate=1e-2, batch_size=16), mesh,
                             param_sharding=sys.argv[2], train_vocabulary=True)
rng = np.random.default_rng(0)
batch = shard_batch({"history": rng.integers(-1, 6, (16, 5)).astype(np.int32),
                     "target": rng.integers(0, 6, 16).astype(np.int32),
                     "weight": np.ones(16, np.float32)}, mesh)
context = replicate({"item_tokens": jnp.asarray(TABLE.item_tokens(6))}, mesh)
params = trainer.init_params
opt = trainer.trainer.init_opt_state(params)
losses = []
for i in range(3):
  params, opt, metrics = trainer.trainer.train_step(params, opt, batch, jax.random.key(i), context,
                                                    trainable=lcrec.FINE_TUNED)
  losses.append(float(metrics["loss"]))
model = trainer.trainer.merge(params)
shards = lambda x: len({str(s.index) for s in x.addressable_shards})
moments = [x for x in jax.tree.leaves(opt[lcrec.ROWS]) if x.shape == (256, 64)]
print(json.dumps({"devices": jax.device_count(), "losses": losses,
                  "kernel_shards": shards(model.backbone.layers[0].mlp.up_proj.base.kernel[...]),
                  "trained_shards": shards(model.backbone.embed_tokens.embedding[...]),
                  "moment_shards": [shards(x) for x in moments]}))
"""


def _fsdp_run(devices, sharding):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = TEST_XLA_FLAGS  # the device count comes from cpu_devices alone
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", _FSDP, str(devices), sharding], env=env,
                       cwd=root, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_fsdp_on_eight_devices_equals_one_device():
  """The model split over 8 simulated devices (FSDP: a frozen kernel, a trained embedding and
  its Adam moments in 8 shards each) trains with the losses of 1 device."""
  one = _fsdp_run(1, "replicated")
  eight = _fsdp_run(8, "fsdp")
  assert one["devices"] == 1 and eight["devices"] == 8
  assert eight["kernel_shards"] == eight["trained_shards"] == 8
  assert eight["moment_shards"] == [8, 8]
  np.testing.assert_allclose(eight["losses"], one["losses"], atol=1e-5)


def test_checkpoint_backbone_and_tokenizer(tmp_path):
  """`grm.checkpoint=DIR` builds LC-Rec on the checkpoint's weights with the prompt encoded by
  its own tokenizer (the fixture's word-level tokenizer.json) and its eos token."""
  from genrec_jax.recommenders.lcrec import checkpoint_prompt_tokens
  from genrec_jax.stages import lcrec_trainer
  from tests.conftest import tiny_config
  directory = os.path.join(os.path.dirname(__file__), "fixtures", "qwen2_untied")
  prompt = checkpoint_prompt_tokens(directory)
  assert prompt.eos == 39 and prompt.separator == (2,)  # "<|im_end|>", ","
  assert 0 not in prompt.prefix + prompt.suffix and len(prompt.prefix) == 27  # no [UNK]
  config = tiny_config(str(tmp_path), method="continual")
  config.grm.update(backbone="lcrec", checkpoint=directory)
  trainer = lcrec_trainer(config, TABLE.vocab_size, make_mesh())
  assert trainer.prompt == prompt and trainer.model_cfg.vocab_size == 96
  embedding = trainer.trainer.merge(trainer.init_params).backbone.embed_tokens.embedding[...]
  from genrec_jax.recommenders.hf_checkpoint import read_safetensors
  np.testing.assert_array_equal(np.asarray(embedding), read_safetensors(
      os.path.join(directory, "model.safetensors"))["model.embed_tokens.weight"])
