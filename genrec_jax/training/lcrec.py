"""Training and ranking of the LC-Rec recommender (Qwen2 + LoRA over identifier prompts).

The same protocol as the T5 recommender (`training.grm`): samples are (history, next item),
batches carry item indices, the identifier map is a device input of the compiled steps, and
ranking is trie-constrained beam search (beam 20) with the library's model-agnostic
`beam_search`. What differs is the model's side:

- Inputs: `prompt_inputs` writes each history into LC-Rec's instruction prompt
  (`recommenders.lcrec`) on the device; identifier token t of the table (t >= 1) is LLM token
  base_vocab + t - 1.
- Loss (`lcrec_loss`): cross-entropy on the response only, the target's D identifier tokens and
  the end-of-sequence token (LC-Rec's `only_train_response`), averaged over the D + 1 tokens and
  the real samples; logits are computed at those D + 1 positions only. Given the previous
  period's adapters in its context, the objective adds PESO's proximal term, lambda times
  `lora.proximal_kl` of the adapters against them.
- Ranking (`lcrec_rank`): the prompt minus its last token is prefilled into a key/value cache;
  the beam search's start token is that last token (the same for every prompt), and each step
  feeds one token per beam through the cache. Scores are log-softmaxes over the whole extended
  vocabulary, as LC-Rec's constrained `generate` computes them (its vocabulary is the
  tokenizer's length plus the added tokens; ours keeps the checkpoint's padded embedding rows,
  271 unused ones for Qwen2.5, in the softmax).
- Trained parameters: the adapters and the identifier rows (one AdamW each); the rest of the
  backbone is a frozen group (`Trainer` filters) and stays out of the checkpoints, unless
  `train_vocabulary` also trains the base embedding and output layer (LC-Rec's
  `modules_to_save`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from genrec_jax.decoding.beam_search import beam_search, distinct_items
from genrec_jax.decoding.trie import SparseTrie, Trie
from genrec_jax.recommenders import lora
from genrec_jax.recommenders.lcrec import LCRec, PromptTokens
from genrec_jax.recommenders.qwen2 import Qwen2, causal_mask, positions_from_mask
from genrec_jax.training.grm import (GRMTrainConfig, GRMTrainer, identifier_nll, optimizer,
                                     target_tokens, weighted_mean)
from genrec_jax.training.trainer import Trainer

# Parameter groups: the LoRA adapters, the added identifier rows (with train_vocabulary also
# the base embedding and output layer), and the rest of the backbone.
ADAPTERS, ROWS, BACKBONE = "adapters", "rows", "backbone"
FINE_TUNED = (ADAPTERS, ROWS)  # what a fit from given parameters trains


def llm_item_tokens(item_tokens: jax.Array, base_vocab: int) -> jax.Array:
  """The identifier map int32 [N, D] in the table's token ids (>= 1) -> LLM token ids."""
  return item_tokens + (base_vocab - 1)


def prompt_inputs(history: jax.Array, item_tokens: jax.Array, prompt: PromptTokens
                  ) -> tuple[jax.Array, jax.Array]:
  """Prompt token ids int32 [B, T] and real-token mask bool [B, T] of histories int [B, H]
  (-1 = padding) through an identifier map in LLM token ids int32 [N, D].

  T = len(prefix) + H * (len(separator) + D) + len(suffix): slot h holds the separator then
  item h's D tokens; the separator before the first real item and whole padding slots are
  masked (token 0), so a row equals its unpadded prompt (`qwen2` counts positions over real
  tokens only)."""
  b, h = history.shape
  d, s = item_tokens.shape[1], len(prompt.separator)
  real = history >= 0
  first = real & (jnp.cumsum(real, axis=1) == 1)
  items = jnp.where(real[..., None], item_tokens[jnp.maximum(history, 0)], 0)
  separator = jnp.broadcast_to(jnp.asarray(prompt.separator, jnp.int32), (b, h, s))
  slots = jnp.concatenate([separator, items], axis=-1).reshape(b, -1)
  slot_mask = jnp.concatenate([jnp.broadcast_to((real & ~first)[..., None], (b, h, s)),
                               jnp.broadcast_to(real[..., None], (b, h, d))], axis=-1)
  prefix = jnp.broadcast_to(jnp.asarray(prompt.prefix, jnp.int32), (b, len(prompt.prefix)))
  suffix = jnp.broadcast_to(jnp.asarray(prompt.suffix, jnp.int32), (b, len(prompt.suffix)))
  tokens = jnp.concatenate([prefix, jnp.where(slot_mask.reshape(b, -1), slots, 0), suffix], 1)
  mask = jnp.concatenate([jnp.ones(prefix.shape, bool), slot_mask.reshape(b, -1),
                          jnp.ones(suffix.shape, bool)], axis=1)
  return tokens, mask


def lcrec_loss(model: LCRec, batch: dict, key: jax.Array | None, context: dict, *,
               prompt: PromptTokens) -> tuple[jax.Array, dict]:
  """Response cross-entropy of a batch (module docstring), plus PESO's proximal term.

  batch: `history` int32 [B, slots], `target` int32 [B] (-1 = filler), `weight` float [B];
  context: `item_tokens` int32 [N, D] (table token ids); for PESO also `previous_adapters`
  (the previous period's `nnx.state(model, LoRAParam)`) and `proximal_weight` (lambda, a
  float32 scalar), `LCRecTrainer.proximal_context`."""
  item_tokens = llm_item_tokens(context["item_tokens"], model.base_vocab)
  tokens, mask = prompt_inputs(batch["history"], item_tokens, prompt)
  targets, _ = target_tokens(batch["target"], item_tokens)  # [B, D]
  response = jnp.concatenate([targets, jnp.full((targets.shape[0], 1), prompt.eos)], axis=1)
  inputs = jnp.concatenate([tokens, targets], axis=1)  # the last response token is not read
  full = jnp.concatenate([mask, jnp.ones(targets.shape, bool)], axis=1)
  h, _ = model.states(inputs, positions_from_mask(full), causal_mask(full), key=key)
  logits = model.logits(h[:, tokens.shape[1] - 1:])  # [B, D + 1, V]: predicts the response
  loss = weighted_mean(identifier_nll(logits, response), batch["weight"])
  if "previous_adapters" not in context:
    return loss, {}
  penalty = lora.proximal_kl(nnx.state(model, lora.LoRAParam), context["previous_adapters"])
  return loss + context["proximal_weight"] * penalty, {"proximal": penalty}


def prefill(model: LCRec, history: jax.Array, item_tokens: jax.Array, prompt: PromptTokens):
  """The decoding state after every prompt token but the last: (cache, key mask bool [B, P],
  next rotary position int32 [B])."""
  tokens, mask = prompt_inputs(history, llm_item_tokens(item_tokens, model.base_vocab), prompt)
  tokens, mask = tokens[:, :-1], mask[:, :-1]
  _, cache = model.states(tokens, positions_from_mask(mask), causal_mask(mask))
  return cache, mask, mask.sum(axis=1).astype(jnp.int32)


def decode_step(model: LCRec, last_tokens: jax.Array, state):
  """One token per row [R, 1] through the cache -> (log-probabilities [R, V], state)."""
  cache, past, position = state
  new = jnp.ones(last_tokens.shape, bool)
  h, cache = model.states(last_tokens, position[:, None], causal_mask(new, past), cache)
  logp = jax.nn.log_softmax(model.logits(h[:, -1]), axis=-1)
  return logp, (cache, jnp.concatenate([past, new], axis=1), position + 1)


def lcrec_rank(models: tuple[LCRec, ...], weights: tuple[float, ...], history: jax.Array,
               item_tokens: jax.Array, trie: Trie | SparseTrie, prompt: PromptTokens, *,
               offsets, level_sizes, beam_size, constrained, level_softmax
               ) -> tuple[jax.Array, jax.Array]:
  """Beam search over identifiers after each history's prompt: (items int32 [B, beam], scores
  [B, beam]), each item once. Each step scores tokens by the weighted sum of the models'
  log-probabilities (one model: its own; LSAT's score averaging: two, weights 0.5). `offsets`
  are the table's (shifted to LLM ids here)."""
  states = tuple(prefill(m, history, item_tokens, prompt) for m in models)

  def step_fn(last_tokens, states):
    out = [decode_step(m, last_tokens, state) for m, state in zip(models, states)]
    return sum(w * logp for w, (logp, _) in zip(weights, out)), tuple(s for _, s in out)

  shift = models[0].base_vocab - 1
  items, _, scores = beam_search(
      step_fn, states, history.shape[0], trie, tuple(o + shift for o in offsets), level_sizes,
      beam_size, constrained=constrained, level_softmax=level_softmax,
      start_token=prompt.suffix[-1])
  return distinct_items(items, scores)


def row_filter(train_vocabulary: bool):
  """The identifier rows (+ the base embedding and output layer with `train_vocabulary`)."""
  identifiers = lambda path, _: bool(path) and path[0] == "identifiers"
  if not train_vocabulary:
    return identifiers
  vocabulary = lambda path, _: len(path) > 1 and path[1] in ("embed_tokens", "lm_head")
  return nnx.Any(identifiers, vocabulary)


class LCRecTrainer(GRMTrainer):
  """`GRMTrainer`'s protocol (train, rank, evaluate) for LC-Rec.

  Args:
    backbone: a Qwen2 model, loaded from a checkpoint or randomly initialised; wrapped in
      place with LoRA adapters.
    num_identifier_tokens: the identifier table's symbols (its vocab_size - 1).
    prompt: the prompt's token ids (`word_prompt_tokens`, `checkpoint_prompt_tokens`, ...).
    lora_cfg, cfg, mesh, seed: adapters, optimisation/decoding settings, devices, init seed.
    train_vocabulary: also train the base embedding and output layer (LC-Rec's code).
    train_backbone_from_init: a fit that starts from the initial parameters (`params=None`)
      trains the backbone and the identifier rows and leaves the adapters at their initial,
      neutral values: the stand-in for an LLM's pre-training when the backbone is randomly
      initialised (cpu presets), after which adapters start as on a pre-trained LLM. Fits
      from given parameters train the adapters and identifier rows only (`FINE_TUNED`).
    param_sharding: "replicated" or "fsdp" (the backbone split over the devices, `Trainer`).
  """

  def __init__(self, backbone: Qwen2, num_identifier_tokens: int, prompt: PromptTokens,
               lora_cfg: lora.LoRAConfig, cfg: GRMTrainConfig, mesh, seed: int = 0,
               train_vocabulary: bool = False, train_backbone_from_init: bool = False,
               param_sharding: str = "replicated"):
    if cfg.level_softmax:
      raise ValueError("LC-Rec scores identifiers over its whole vocabulary; "
                       "grm.level_softmax must be False")
    self.model_cfg, self.prompt = backbone.cfg, prompt
    self.train_backbone_from_init = train_backbone_from_init
    model = LCRec(backbone, num_identifier_tokens, lora_cfg, rngs=nnx.Rngs(seed))
    backbone_optimizer = optimizer(cfg) if train_backbone_from_init else optax.set_to_zero()
    self._start(cfg, mesh, Trainer(
        model, functools.partial(lcrec_loss, prompt=prompt),
        {ADAPTERS: optimizer(cfg), ROWS: optimizer(cfg), BACKBONE: backbone_optimizer}, mesh,
        filters={ADAPTERS: lora.LoRAParam, ROWS: row_filter(train_vocabulary),
                 BACKBONE: ...},
        param_sharding=param_sharding),
        trainable=FINE_TUNED)
    self._rank_mixture = jax.jit(self._rank_mixture_batch, static_argnames=(
        "weights", "offsets", "level_sizes", "beam_size", "constrained", "level_softmax"))

  def train(self, table, num_items, train, valid, checkpoint_dir, params=None, loop_cfg=None,
            context=None):
    """`GRMTrainer.train`; from the initial parameters with `train_backbone_from_init`, the
    backbone and the rows train (the adapters stay neutral)."""
    self.trainable = ((ROWS, BACKBONE) if params is None and self.train_backbone_from_init
                      else FINE_TUNED)
    return super().train(table, num_items, train, valid, checkpoint_dir, params, loop_cfg,
                         context)

  def adapters(self, params):
    """The LoRA adapters of `params` (an `nnx.State` of LoRAParam variables)."""
    return nnx.state(self.trainer.merge(params), lora.LoRAParam)

  def with_adapters(self, params, adapters):
    """`params` with their LoRA adapters replaced by `adapters` (same structure), on the
    mesh."""
    model = self.trainer.merge(jax.tree.map(jnp.copy, params))
    nnx.update(model, adapters)
    return self.trainer.place(dict(zip(self.trainer.groups, nnx.split(model, *(
        self.trainer.filters[g] for g in self.trainer.groups))[1:])))

  def proximal_context(self, previous_params, weight: float) -> dict:
    """The train context of PESO: the adapters of `previous_params` and lambda."""
    return {"previous_adapters": self.adapters(previous_params),
            "proximal_weight": jnp.float32(weight)}

  def _rank_batch(self, params, history, item_tokens, trie, **static):
    return lcrec_rank((self.trainer.merge(params),), (1.0,), history, item_tokens, trie,
                      self.prompt, **static)

  def _rank_mixture_batch(self, params_list, history, item_tokens, trie, weights, **static):
    models = tuple(self.trainer.merge(p) for p in params_list)
    return lcrec_rank(models, weights, history, item_tokens, trie, self.prompt, **static)

  def rank_mixture(self, params_list, weights: tuple[float, ...], table, num_items: int,
                   samples, beam_size: int | None = None) -> np.ndarray:
    """`rank` with several models whose per-step log-probabilities are mixed with `weights`
    (LSAT's score averaging)."""
    return self._rank_with(
        lambda history, item_tokens, trie, static: self._rank_mixture(
            tuple(params_list), history, item_tokens, trie, weights=tuple(weights),
            **static)[0],
        table, num_items, samples, beam_size)
