"""PIT: a dynamic, personalized, one-to-many item tokenizer trained with the recommender.

METHODS.md section 8 and the abstract (../shared/papers/pit_abstract.txt); there is no public
code, so this module is our reading of them, and every choice they leave open is listed here
and in experiments/pit_toys_cpu/README.md. Stages: data, the RQ-VAE tokenizer on the item texts
(TIGER's: the source identifiers), the generator's warm start, the co-evolution stage.

**Collaborative signal alignment** (`ItemEmbeddings`, `alignment_loss`). Item i's embedding is
e_i = x_i W + v_i: a projection of its text vector x_i plus a free collaborative vector v_i
(zero at the start). A user-item prediction trains it: for a training example (history h,
target t) and a candidate item c of the batch, DIN-style target attention pools the history
with the candidate as query, u(h, c) = sum_s softmax_s(<q(e_c), k(sg e_{h_s})> / sqrt(d))
v(sg e_{h_s}), and the score is <u(h, c), e_c>; the loss is the cross-entropy of the true
target among the batch's targets (in-batch negatives: another row's target counts as often as
it appears, a sampled softmax; rows with the example's own target are not negatives). The
user context, the history
embeddings, is under stop-gradient (the abstract's "user context under stop-gradient"): the
candidate's embedding moves towards the users who chose it, not the reverse. Open choices:
dot-product attention (DIN uses an MLP attention unit), in-batch negatives, text + free vector.

**Item-to-token generator** (`ItemToToken`): a decoder-only transformer (T5 blocks with a causal
mask). Position 0 reads a projection of sg(e_i); position l reads the level-(l - 1) code
(one embedding table per level); position l predicts the level-l code through level l's output
table. It generates the L codes of an identifier; the dedup digit comes from the index. Warm
start (`warm_start`): trained on every item's source identifier (the RQ-VAE's codes) at the
initial embeddings for `pit.warmstart_steps` updates; the exact-reproduction rate is reported.

**Co-evolution** (`pit_loss`): each training example's target owns up to m identifiers in the
index. The recommender (TIGER's T5) scores every one of them by teacher forcing; user-guided
minimum-loss selection keeps, per example, the identifier with the lowest recommender loss
(`select_identifiers`; `pit.selection="random"` picks one uniformly: the ablation); the losses
compared are those of the training pass itself, so with dropout (grm.dropout_rate, 0 in the
cpu preset) each candidate sees its own mask. The
recommender trains on the selected identifier, and the generator learns to generate it from
the target's embedding: L = L_rec(selected) + L_gen(selected) + L_align. The three terms train
disjoint parameter groups (T5; generator; embeddings and attention), so their relative weights
would not matter under Adam and there are none. The encoder reads each history item through
its primary identifier (slot 0: the most selected at the last refresh).

**One-to-many beam index** (`Index`, `refresh_index`). The candidates of minimum-loss
selection are the target's identifiers in the index, fixed between two refreshes, so that
each carries the dedup digit the recommender predicts (the abstract has the generator propose
the candidates: here its proposals enter the index at a refresh and are selected among from
then on). The train step counts each identifier's selections. A refresh (after every
`pit.index_every` epochs) prunes the weak identifiers, those that took less than
`pit.prune_share` of their item's selections since the last refresh; the most selected
becomes the primary; free slots take the generator's best new sequences (`pit.candidates`
beams), each with the smallest dedup digit that no identifier of the index uses with the same
codes, so no identifier maps to two items. Decoding runs trie-constrained beam search over
every identifier of the index and keeps each item's best-ranked identifier (`distinct_items`).
With m = 1 nothing is pruned or added: the identifiers stay the source ones.

**Over time** (`continual`): the `pit` row of the continual protocol carries the model from
period to period; each period's new catalog items get the generator's identifiers, and
co-evolution on the period's interactions moves the embeddings, the generator and the index.

Settings the sources do not give (ours): m = 3 identifiers per item, 8 generated candidates
per item per refresh, a refresh after every epoch, pruning below 10 % of the item's
selections, the generator's size (2 blocks, d 128), the embedding size 64 and the learning
rates (`pit` config fields). The reported offline numbers were measured with the item-to-token
model frozen (METHODS.md); `pit.train_generator=False` freezes it here, an ablation, while the
default trains it (the co-evolution the paper names).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from genrec_jax import stages
from genrec_jax.data.batching import item_batches
from genrec_jax.data.splits import subsample
from genrec_jax.decoding.beam_search import NEG_INF, beam_search
from genrec_jax.decoding.trie import Trie
from genrec_jax.recommenders.t5 import T5, Stack, T5Config
from genrec_jax.methods import dact
from genrec_jax.tokenizers import reassign
from genrec_jax.tokenizers.identifiers import (IdentifierTable, Identifiers,
                                               write_identifiers_csv)
from genrec_jax.training import loop
from genrec_jax.training.checkpoint import restore_or_run
from genrec_jax.training.grm import (beam_metrics, beam_rank, device_trie, identifier_inputs,
                                     identifier_nll, rank_samples, ranking_options,
                                     weighted_mean)
from genrec_jax.training.optim import make_optimizer
from genrec_jax.training.sharding import replicate, sharded_training_batches
from genrec_jax.training.trainer import Trainer

EMBEDDINGS, GENERATOR, RECOMMENDER, INDEX = "embeddings", "generator", "recommender", "index"
SELECTIONS = ("min_loss", "random")


class ItemEmbeddings(nnx.Module):
  """Item embeddings e_i = x_i W + v_i [num_items, dim] and the DIN-style target attention of
  the alignment task (query, key, value projections)."""

  def __init__(self, num_items: int, input_dim: int, dim: int, *, rngs: nnx.Rngs):
    self.text = nnx.Linear(input_dim, dim, rngs=rngs)
    self.free = nnx.Param(jnp.zeros((num_items, dim), jnp.float32))
    self.query = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
    self.key = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
    self.value = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)

  def __call__(self, items: jax.Array, features: jax.Array) -> jax.Array:
    """Embeddings [..., dim] of item indices [...] >= 0; features [num_items, D_in]."""
    return self.text(features[items]) + self.free[...][items]

  def user_context(self, candidates: jax.Array, history: jax.Array, mask: jax.Array
                   ) -> jax.Array:
    """Target attention: the history [B, S, dim] (mask bool [B, S]) pooled for every
    candidate embedding [C, dim] as query -> user vectors [B, C, dim] (0 for no history)."""
    q = self.query(candidates) / jnp.sqrt(candidates.shape[-1])
    logits = jnp.einsum("cd,bsd->bcs", q, self.key(history))
    logits = jnp.where(mask[:, None, :], logits, -1e30)
    weights = jax.nn.softmax(logits, axis=-1) * mask.any(-1)[:, None, None]
    return jnp.einsum("bcs,bsd->bcd", weights, self.value(history))


def alignment_loss(embeddings: ItemEmbeddings, history: jax.Array, target: jax.Array,
                   weight: jax.Array, features: jax.Array) -> jax.Array:
  """The collaborative alignment (module docstring): in-batch cross-entropy of each example's
  target among the batch's targets, scored <u(h, c), e_c> with the history under
  stop-gradient. history int [B, S] (-1 = padding), target int [B] (-1 = filler), weight
  float [B]. Another row with the same target is not a negative. Returns a scalar."""
  e_target = embeddings(jnp.maximum(target, 0), features)  # [B, d]
  e_history = jax.lax.stop_gradient(embeddings(jnp.maximum(history, 0), features))
  mask = history >= 0
  user = embeddings.user_context(e_target, e_history, mask)  # [B, B, d]
  logits = jnp.einsum("bcd,cd->bc", user, e_target)
  b = target.shape[0]
  negative = (target[:, None] != target[None, :]) & (weight[None, :] > 0)
  logits = jnp.where(negative | jnp.eye(b, dtype=bool), logits, -1e30)
  nll = -jnp.diagonal(jax.nn.log_softmax(logits, axis=-1))
  return weighted_mean(nll, weight * mask.any(-1))


class ItemToToken(nnx.Module):
  """Decoder-only generator of an item's L codes from its embedding (module docstring).

  Args:
    embedding_dim: size of the item embeddings it reads.
    num_levels, codebook_size: L and K of the identifiers.
    cfg: the transformer's sizes (d_model, d_ff, heads, num_encoder_layers blocks); its vocab
      size is unused.
  """

  def __init__(self, embedding_dim: int, num_levels: int, codebook_size: int, cfg: T5Config,
               *, rngs: nnx.Rngs):
    self.levels, self.codebook_size = num_levels, codebook_size
    self.project = nnx.Linear(embedding_dim, cfg.d_model, rngs=rngs)
    self.code_embed = nnx.Param(jax.random.normal(
        rngs.params(), (num_levels, codebook_size, cfg.d_model)))
    self.stack = Stack(cfg, cfg.num_encoder_layers, False, rngs)
    self.head = nnx.Param(jax.random.normal(
        rngs.params(), (num_levels, cfg.d_model, codebook_size)) * cfg.d_model ** -0.5)

  def logits(self, embedding: jax.Array, codes: jax.Array) -> jax.Array:
    """Per-level code logits [R, L, K] by teacher forcing: embeddings [R, E] and codes int
    [R, L] (only the first L - 1 are read; position l predicts code l)."""
    inputs = [self.project(embedding)[:, None]]
    inputs += [self.code_embed[level][codes[:, level]][:, None]
               for level in range(self.levels - 1)]
    causal = jnp.tril(jnp.ones((self.levels, self.levels), bool))[None, None]
    states, _ = self.stack(jnp.concatenate(inputs, axis=1), causal, None)
    return jnp.einsum("rld,ldk->rlk", states, self.head[...])

  def code_log_probs(self, embedding: jax.Array, codes: jax.Array) -> jax.Array:
    """log p(code_l | embedding, codes_<l) [R, L] of codes int [R, L]."""
    logp = jax.nn.log_softmax(self.logits(embedding, codes), axis=-1)
    return jnp.take_along_axis(logp, codes[..., None], axis=-1)[..., 0]

  def generate(self, embedding: jax.Array, beam_size: int) -> tuple[jax.Array, jax.Array]:
    """The top `beam_size` code sequences of each embedding [R, E] by beam search (the
    library's `beam_search`, unconstrained): codes int32 [R, beam, L] and their
    log-probabilities [R, beam], best first."""
    rows, levels, k = embedding.shape[0], self.levels, self.codebook_size
    offsets = tuple(1 + level * k for level in range(levels))

    def step(last_tokens, state):
      # state: the embedding, the codes so far [R, L] and their number [R]; the start token
      # (first call) adds no code.
      done = state["length"]
      slot = jnp.arange(levels)[None, :] == (done - 1)[:, None]
      codes = jnp.where(slot, last_tokens - 1 - (done[:, None] - 1) * k, state["codes"])
      logp = jax.nn.log_softmax(self.logits(state["embedding"], codes), axis=-1)
      logp = jnp.take_along_axis(logp, jnp.minimum(done, levels - 1)[:, None, None], 1)[:, 0]
      # every level's slice of the vocabulary holds the current level's distribution
      vocab = jnp.concatenate([jnp.zeros((logp.shape[0], 1)), jnp.tile(logp, (1, levels))], -1)
      return vocab, {"embedding": state["embedding"], "codes": codes, "length": done + 1}

    start = {"embedding": embedding, "codes": jnp.zeros((rows, levels), jnp.int32),
             "length": jnp.zeros((rows,), jnp.int32)}
    no_trie = Trie(children=-jnp.ones((1, k), jnp.int32), leaf_item=-jnp.ones((1,), jnp.int32))
    _, tokens, scores = beam_search(step, start, rows, no_trie, offsets, (k,) * levels,
                                    beam_size, constrained=False)
    return tokens - jnp.asarray(offsets)[None, None, :], scores


def select_identifiers(nll: jax.Array, count: jax.Array, selection: str = "min_loss",
                       key: jax.Array | None = None) -> jax.Array:
  """Each example's identifier among its target's candidates: nll [B, m] (the recommender's
  loss of each candidate), count int [B] (candidates past it are padding). "min_loss": the
  argmin over the valid candidates (no gradient through the choice); "random": uniform over
  them (slot 0 without a key). Returns int32 [B]."""
  if selection not in SELECTIONS:
    raise ValueError(f"pit.selection must be one of {SELECTIONS}, got {selection!r}")
  count = jnp.maximum(count, 1)
  if selection == "random":
    if key is None:
      return jnp.zeros(count.shape, jnp.int32)
    return jax.random.randint(key, count.shape, 0, count).astype(jnp.int32)
  valid = jnp.arange(nll.shape[1])[None, :] < count[:, None]
  return jnp.argmin(jnp.where(valid, jax.lax.stop_gradient(nll), jnp.inf), axis=1
                    ).astype(jnp.int32)


class SelectionCounts(nnx.Variable):
  """How often each identifier of the index was selected since the last refresh, float32
  [num_items, m]: written by the train step (`Trainer(written=...)`), never trained."""


class Index(nnx.Module):
  """The one-to-many index in the model state (not trained): every item's identifiers as GRM
  tokens int32 [num_items, m, D] (slot 0 = the primary, 0 rows past the item's count), the
  counts int32 [num_items] and the selections of each slot since the last refresh."""

  def __init__(self, token_sets: np.ndarray, count: np.ndarray):
    self.token_sets = Identifiers(jnp.asarray(token_sets, jnp.int32))
    self.count = Identifiers(jnp.asarray(count, jnp.int32))
    self.usage = SelectionCounts(jnp.zeros(token_sets.shape[:2], jnp.float32))


class PIT(nnx.Module):
  """The four groups of the co-evolution stage: item embeddings (with the alignment's
  attention), generator, recommender (T5) and index."""

  def __init__(self, embeddings: ItemEmbeddings, generator: ItemToToken, recommender: T5,
               index: Index):
    self.embeddings, self.generator = embeddings, generator
    self.recommender, self.index = recommender, index


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Forms of the co-evolution objective (`pit_loss`)."""

  selection: str = "min_loss"
  rec_reduction: str = "mean"  # L_rec over target tokens (`identifier_nll`)
  level_sizes: tuple[int, ...] = ()  # one softmax per identifier position (grm.level_softmax)
  code_offsets: tuple[int, ...] = ()  # GRM token of code 0 at each code level


def pit_loss(model: PIT, batch: dict, key: jax.Array | None, context: dict, cfg: LossConfig
             ) -> tuple[jax.Array, dict]:
  """L_rec(selected) + L_gen(selected) + L_align of one batch (module docstring).

  batch: `history` int32 [B, slots] and `target` int32 [B] item indices (-1 = padding /
  filler), `weight` float [B]; context: `features` float [num_items, D_in] (text vectors).
  Returns (loss, parts): `rec`, `generator`, `align` and `alternative_selected` (the fraction
  of examples whose selected identifier is not their target's primary). Adds each example's
  weight to its selected identifier's count in the index (`Index.usage`)."""
  keys = [None] * 3 if key is None else list(jax.random.split(key, 3))
  t5, index = model.recommender, model.index
  token_sets, count = index.token_sets[...], index.count[...]
  encoded, mask = t5.encode(identifier_inputs(batch["history"], token_sets[:, 0]), keys[0])
  target = jnp.maximum(batch["target"], 0)
  candidates = jnp.where(batch["target"][:, None, None] >= 0, token_sets[target], 0)
  b, m, depth = candidates.shape
  decoder_inputs = jnp.pad(candidates[..., :-1], ((0, 0), (0, 0), (1, 0))).reshape(b * m, depth)
  logits = t5.decode(encoded, mask, decoder_inputs, keys[1])  # [B * m, D, V]
  nll = identifier_nll(logits, candidates.reshape(b * m, depth), cfg.rec_reduction,
                       cfg.level_sizes).reshape(b, m)
  choice = select_identifiers(nll, count[target], cfg.selection, keys[2])
  weight = batch["weight"] * (count[target] > 0)  # a target the index lacks is no example
  parts = {"rec": weighted_mean(jnp.take_along_axis(nll, choice[:, None], 1)[:, 0], weight)}
  chosen = jnp.take_along_axis(candidates, choice[:, None, None], 1)[:, 0]  # [B, D]
  levels = len(cfg.code_offsets)
  codes = jnp.maximum(chosen[:, :levels] - jnp.asarray(cfg.code_offsets)[None, :], 0)
  e_target = jax.lax.stop_gradient(model.embeddings(target, context["features"]))
  gen_nll = -model.generator.code_log_probs(e_target, codes).mean(-1)
  parts["generator"] = weighted_mean(gen_nll, weight)
  parts["align"] = alignment_loss(model.embeddings, batch["history"], batch["target"], weight,
                                  context["features"])
  parts["alternative_selected"] = weighted_mean((choice > 0).astype(jnp.float32), weight)
  index.usage[...] = index.usage[...].at[target, choice].add(weight)  # read at the refresh
  return parts["rec"] + parts["generator"] + parts["align"], parts


def warm_start_loss(model: PIT, batch: dict, key, context: dict) -> tuple[jax.Array, dict]:
  """The generator's cross-entropy on a batch (`idx` int [B], rows of the source table) of
  source identifiers; context: `features`, the source table's `items` int32 [S] and `codes`
  int32 [S, L] (the RQ-VAE's)."""
  del key
  idx = batch["idx"]
  e = jax.lax.stop_gradient(model.embeddings(context["items"][idx], context["features"]))
  return -model.generator.code_log_probs(e, context["codes"][idx]).mean(), {}


def refresh_index(table: IdentifierTable, num_items: int, usage: np.ndarray,
                  candidates: np.ndarray, candidate_scores: np.ndarray, max_identifiers: int,
                  prune_share: float, active: np.ndarray | None = None
                  ) -> tuple[IdentifierTable, dict]:
  """The index after one refresh (module docstring), and its statistics.

  An item that was selected since the last refresh keeps its identifiers that took at least
  `prune_share` of its selections (its most selected one always), most selected first (the
  primary); an item that was not keeps them all, in order. Free slots, up to m, take the
  generator's best sequences that none of the item's identifiers has, each with the smallest
  dedup digit no identifier of the index uses with the same codes (identifiers pruned in this
  refresh included, so that none passes to another item at once); a sequence whose group has
  no free digit is skipped.

  Args:
    table: the current index, rows grouped by item in slot order (the primary first).
    num_items: N.
    usage: float [M], each row's selections since the last refresh.
    candidates: int [N, C, L], generated code sequences per item, best first;
      candidate_scores [N, C] their generator log-probabilities (`beam_search`'s NEG_INF =
      none).
    max_identifiers: m, the most identifiers an item keeps.
    prune_share: the smallest share of its item's selections an identifier needs to stay.
    active: bool [N], the items that may gain identifiers (the catalog of a period; default
      all): an item outside it keeps what it has, an item inside it without identifiers (new
      in the catalog) gets the generator's best.

  Returns:
    The new table, rows grouped by item in slot order, and stats: identifiers,
    identifiers_per_item, added, pruned, rejected (sequences skipped for a full group),
    primary_change (fraction of items whose primary changed).
  """
  levels, dedup_size = table.depth - 1, table.level_sizes[-1]
  used: dict[tuple, set] = {}
  for row in table.codes.tolist():
    used.setdefault(tuple(row[:-1]), set()).add(row[-1])
  order = np.argsort(table.item, kind="stable")
  bounds = np.searchsorted(table.item[order], np.arange(num_items + 1))
  rows, owners, added, pruned, rejected = [], [], 0, 0, 0
  for item in range(num_items):
    mine = order[bounds[item]:bounds[item + 1]]
    total = usage[mine].sum()
    keep = list(mine)
    if total > 0:
      best = mine[np.argmax(usage[mine])]
      keep = [r for r in mine if usage[r] >= prune_share * total or r == best]
      keep.sort(key=lambda r: -usage[r])  # stable: slot order among equals
    pruned += len(mine) - len(keep)
    rows += [tuple(row) for row in table.codes[keep].tolist()]
    present = {tuple(row[:-1]) for row in table.codes[mine].tolist()}
    kept = len(keep) if active is None or active[item] else max_identifiers
    for codes, score in zip(candidates[item].tolist(), candidate_scores[item]):
      codes = tuple(codes)
      if kept == max_identifiers:
        break
      if score <= NEG_INF / 2 or codes in present:
        continue
      present.add(codes)
      taken = used.setdefault(codes, set())
      digit = next((d for d in range(dedup_size) if d not in taken), -1)
      if digit < 0:
        rejected += 1
        continue
      taken.add(digit)
      rows.append(codes + (digit,))
      added += 1
      kept += 1
    owners += [item] * (len(rows) - len(owners))
  new = IdentifierTable(np.asarray(rows, np.int32).reshape(-1, levels + 1),
                        np.asarray(owners, np.int32), table.level_sizes)
  stats = {"identifiers": len(rows), "identifiers_per_item": len(rows) / num_items,
           "added": added, "pruned": pruned, "rejected": rejected,
           "primary_change": float(np.any(new.item_tokens(num_items)
                                          != table.item_tokens(num_items), axis=1).mean())}
  return new, stats


class CoEvolution:
  """The co-evolution stage of one run: the model built from the source identifiers, the
  generator's warm start, the training with the index refreshed on schedule, and ranking.

  Args:
    config: the run's config (`pit`, `grm`, `tokenizer` fields).
    table: the source identifiers (the RQ-VAE's), at most one per item (items without one are
      not in the catalog yet: continual periods).
    features: float [num_items, D_in], the item text vectors.
    num_items: the number of items.
    mesh: the device mesh.
  """

  def __init__(self, config: ml_collections.ConfigDict, table: IdentifierTable,
               features: np.ndarray, num_items: int, mesh):
    p = self.settings = config.pit
    self.config, self.mesh = config, mesh
    self.num_items = num_items
    self.active: np.ndarray | None = None  # items that may gain identifiers (`refresh_index`)
    self.level_sizes, self.offsets = tuple(table.level_sizes), table.offsets
    self.levels = table.depth - 1
    self.source_codes = table.codes[:, :-1]  # warm-start targets of the items table.item
    self.source_items = table.item
    self.grm_cfg = grm_cfg = stages.grm_train_config(config)
    rngs = nnx.Rngs(config.seed)
    g = p.generator
    generator_cfg = T5Config(vocab_size=0, d_model=g.d_model, d_ff=g.d_ff,
                             num_heads=g.num_heads, d_kv=g.d_model // g.num_heads,
                             num_encoder_layers=g.num_layers, num_decoder_layers=0,
                             dropout_rate=0.0)
    token_sets, count = table.item_token_sets(self.num_items, width=p.max_identifiers)
    model = PIT(ItemEmbeddings(self.num_items, features.shape[1], p.embedding_dim, rngs=rngs),
                ItemToToken(p.embedding_dim, self.levels, table.level_sizes[0], generator_cfg,
                            rngs=rngs),
                T5(stages.grm_model_config(config, table.vocab_size), rngs=rngs),
                Index(token_sets, count))
    self.objective = LossConfig(
        selection=p.selection, rec_reduction=grm_cfg.loss_reduction,
        level_sizes=self.level_sizes if grm_cfg.level_softmax else (),
        code_offsets=tuple(int(o) for o in table.offsets[:-1]))
    generator_optimizer = (make_optimizer(p.generator_lr, p.weight_decay, 0, p.grad_clip)
                           if p.train_generator else optax.set_to_zero())
    self.trainer = Trainer(
        model, functools.partial(pit_loss, cfg=self.objective),
        {EMBEDDINGS: make_optimizer(p.embedding_lr, p.weight_decay, 0, p.grad_clip),
         GENERATOR: generator_optimizer,
         RECOMMENDER: make_optimizer(grm_cfg.learning_rate, grm_cfg.weight_decay,
                                     grm_cfg.warmup_steps, grm_cfg.grad_clip),
         INDEX: optax.set_to_zero()}, mesh, written=(INDEX,))
    self.context = {"features": jnp.asarray(features, jnp.float32)}
    self._embed = jax.jit(lambda params, items, features: self.trainer.merge(params).embeddings(
        items, features))
    self._generate = jax.jit(lambda params, e, beam: self.trainer.merge(params).generator
                             .generate(e, beam), static_argnums=2)
    self._rank = jax.jit(self._rank_batch, static_argnames=(
        "offsets", "level_sizes", "beam_size", "constrained", "level_softmax"))

  def warm_start(self, checkpoint_dir: str) -> tuple[dict, dict]:
    """Trains the generator on the source codes at the initial embeddings
    (`pit.warmstart_steps` batches of `pit.warmstart_batch_size` items, AdamW at
    `pit.warmstart_lr`), once: a rerun restores it. Returns the starting parameters of the
    co-evolution stage and the statistics: the fraction of items whose best generated
    sequence (the top of `pit.candidates` beams) is their source identifier (`reproduced`),
    and whose beams hold it (`reproduced_in_beam`)."""
    p = self.settings
    trainer = Trainer(self.trainer.merge(self.trainer.init_params), warm_start_loss,
                      {EMBEDDINGS: optax.set_to_zero(),
                       GENERATOR: make_optimizer(p.warmstart_lr, 0.0, 0, p.grad_clip),
                       RECOMMENDER: optax.set_to_zero(), INDEX: optax.set_to_zero()},
                      self.mesh)
    context = replicate({**self.context, "codes": jnp.asarray(self.source_codes),
                         "items": jnp.asarray(self.source_items)}, self.mesh)
    key = jax.random.key(self.config.seed)

    def run():
      def train_step(params, opt_state, batch, i):
        return trainer.item_update(params, opt_state, batch, i, key, context,
                                   trainable=(GENERATOR,))

      params, stats = loop.fit_steps(
          name="pit_warm_start", params=trainer.init_params,
          opt_state=trainer.init_opt_state(trainer.init_params), train_step=train_step,
          batches=item_batches(len(self.source_items), p.warmstart_batch_size,
                               self.config.seed),
          steps=p.warmstart_steps, log_every=max(1, p.warmstart_steps // 5))
      in_beam = self.generate(params, p.candidates)[0][self.source_items]
      source = self.source_codes
      stats.update(reproduced=float(np.all(in_beam[:, 0] == source, axis=1).mean()),
                   reproduced_in_beam=float(np.any(np.all(in_beam == source[:, None], -1),
                                                   axis=1).mean()))
      logging.info("[pit] warm start: the generator reproduces %.1f %% of the source "
                   "identifiers (%.1f %% within %d beams)", 100 * stats["reproduced"],
                   100 * stats["reproduced_in_beam"], p.candidates)
      return {GENERATOR: params[GENERATOR]}, stats

    items, stats = restore_or_run(checkpoint_dir, {GENERATOR: self.trainer.init_params[GENERATOR]},
                                  run)
    params = {**self.trainer.init_params, GENERATOR: replicate(items[GENERATOR], self.mesh)}
    return jax.tree.map(jnp.copy, params), stats

  def embeddings(self, params) -> jax.Array:
    """Every item's embedding [num_items, E]."""
    return self._embed(params, jnp.arange(self.num_items), self.context["features"])

  def generate(self, params, beam: int, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """The generator's top `beam` code sequences of every item: int [N, beam, L], scores."""
    e = self.embeddings(params)
    outs = [self._generate(params, e[i:i + batch], beam) for i in range(0, self.num_items, batch)]
    return (np.concatenate([np.asarray(o[0]) for o in outs]),
            np.concatenate([np.asarray(o[1]) for o in outs]))

  def table(self, params) -> IdentifierTable:
    """The index held in the parameters: every item's identifiers, primary first."""
    return self.index_rows(params)[0]

  def index_rows(self, params) -> tuple[IdentifierTable, np.ndarray]:
    """The index's table (rows grouped by item in slot order) and each row's selections
    since the last refresh, float [M]."""
    index = jax.device_get(params[INDEX][INDEX])
    tokens, count = np.asarray(index["token_sets"][...]), np.asarray(index["count"][...])
    valid = np.arange(tokens.shape[1])[None, :] < count[:, None]
    item = np.broadcast_to(np.arange(self.num_items)[:, None], valid.shape)[valid]
    return (IdentifierTable(tokens[valid] - self.offsets[None, :], item.astype(np.int32),
                            self.level_sizes), np.asarray(index["usage"][...])[valid])

  def refresh(self, epoch: int, params) -> tuple[dict, dict]:
    """After every `pit.index_every` epochs: the index pruned by the selections counted since
    the last refresh and extended by the generator (`reindex`), and its statistics."""
    if (epoch + 1) % self.settings.index_every:
      return params, {}
    params, stats = self.reindex(params, prune=True)
    logging.info("[pit] epoch %d index: %d identifiers (%.2f per item), %d added, %d pruned, "
                 "%d rejected, primary changed for %.1f %% of items, the generator's best in "
                 "the index for %.1f %%", epoch + 1, stats["identifiers"],
                 stats["identifiers_per_item"], stats["added"], stats["pruned"],
                 stats["rejected"], 100 * stats["primary_change"],
                 100 * stats["generator_top_in_index"])
    return params, stats

  def extend(self, params) -> tuple[dict, dict]:
    """The index with identifiers for the active items that own none (new in the catalog)
    and free slots filled, nothing pruned (`reindex` with no selections counted)."""
    return self.reindex(params, prune=False)

  def reindex(self, params, prune: bool) -> tuple[dict, dict]:
    """`refresh_index` of the index in `params` with the selections counted since the last
    refresh (`prune`; else none, so nothing is pruned) and the generator's candidates,
    written into the parameters with the counts reset."""
    p = self.settings
    table, usage = self.index_rows(params)
    candidates, candidate_scores = self.generate(params, p.candidates)
    new, stats = refresh_index(table, self.num_items, usage if prune else np.zeros_like(usage),
                               candidates, candidate_scores, p.max_identifiers, p.prune_share,
                               self.active)
    token_sets, count = new.item_token_sets(self.num_items, width=p.max_identifiers)
    indexed_codes = token_sets[..., :-1] - self.offsets[None, None, :-1]
    top_in_index = np.all(indexed_codes == candidates[:, None, 0], axis=-1) & (
        np.arange(p.max_identifiers)[None, :] < count[:, None])
    stats["generator_top_in_index"] = float(top_in_index.any(1)[count > 0].mean())
    model = self.trainer.merge(params)
    model.index.token_sets[...] = jnp.asarray(token_sets)
    model.index.count[...] = jnp.asarray(count)
    model.index.usage[...] = jnp.zeros_like(model.index.usage[...])
    return {**params, INDEX: replicate(nnx.state(model, lambda path, _: path[0] == INDEX),
                                       self.mesh)}, stats

  def epoch_batches(self, train, seed: int, epoch: int):
    cfg = self.grm_cfg
    return sharded_training_batches(
        train, cfg.batch_size, cfg.length_buckets, self.mesh, seed=seed,
        epoch=epoch, grouping=cfg.batch_grouping, steps_per_dispatch=cfg.steps_per_dispatch)

  def _rank_batch(self, params, history, trie, **static):
    model = self.trainer.merge(params)
    t5 = model.recommender
    encoded, mask = t5.encode(identifier_inputs(history, model.index.token_sets[...][:, 0]))
    return beam_rank(t5, encoded, mask, trie, **static)

  def rank(self, params, samples, constrained: bool | None = None) -> np.ndarray:
    """Ranked distinct items int32 [S, beam] of every sample (-1 = none): beam search over
    every identifier of the index, each item at its best identifier's rank. A beam that holds
    two identifiers of one item ranks fewer items than beams (-1 at the end; measured on Toys:
    19.97 items of 20 on average, experiments/pit_toys_cpu)."""
    table = self.table(params)
    static = ranking_options(table, self.grm_cfg, constrained=constrained)
    # one trie shape whatever the index holds: capacity for m identifiers per item
    trie = device_trie(table, self.num_items * self.settings.max_identifiers, self.mesh)
    return rank_samples(lambda history: self._rank(params, history, trie, **static)[0],
                        samples, self.grm_cfg.eval_batch_size, self.grm_cfg.length_buckets,
                        static["beam_size"], self.mesh)

  def evaluate(self, params, samples, constrained: bool | None = None) -> dict:
    """Recall/NDCG@{5,10,20} of `rank` against the samples' targets."""
    t0 = time.time()
    return beam_metrics(self.rank(params, samples, constrained), samples, time.time() - t0)

  def fit(self, params, train, selection, loop_cfg: loop.LoopConfig, checkpoint_dir: str,
          interrupt_after_epoch: int | None = None):
    """The co-evolution stage from `params` on the samples `train` with model selection on
    `selection` under `loop_cfg`: (best parameters, loop state)."""
    if len(train) == 0:
      raise ValueError("PIT's training set is empty")
    return self.trainer.fit(
        name="pit", epoch_batches=functools.partial(self.epoch_batches, train, loop_cfg.seed),
        evaluate=lambda params: self.evaluate(params, selection),
        loop_cfg=loop_cfg, checkpoint_dir=checkpoint_dir, params=params,
        context=self.context, trainable=(EMBEDDINGS, GENERATOR, RECOMMENDER),
        after_epoch=self.refresh, interrupt_after_epoch=interrupt_after_epoch)

  def with_recommender(self, params, t5: T5) -> dict:
    """`params` with the recommender's weights taken from `t5` (a trained TIGER T5)."""
    model = self.trainer.merge(params)
    nnx.update(model.recommender, nnx.state(t5))
    return {**params, RECOMMENDER: replicate(
        nnx.state(model, lambda path, _: path[0] == RECOMMENDER), self.mesh)}


def primary_table(table: IdentifierTable, num_items: int) -> IdentifierTable:
  """The primaries (each item's first row) of an index: one identifier per indexed item."""
  first = np.unique(table.item, return_index=True)[1]
  return IdentifierTable(table.codes[first], table.item[first], table.level_sizes)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Data, the RQ-VAE (source identifiers), the generator's warm start, co-evolution, the
  test metrics of the final index."""
  mesh = stages.start_run(config, workdir)
  timer = stages.Timer()
  inter, split, results = stages.static_data(config, workdir)
  timer.lap("data")
  table, results["tokenizer"], _, features = stages.item_tokenizer(config, inter, workdir,
                                                                   None, timer)
  stage = CoEvolution(config, table, features, split.num_items, mesh)
  params, results["warm_start"] = stage.warm_start(
      os.path.join(workdir, "checkpoints", "warm_start"))
  timer.lap("warm_start")
  selection = subsample(split.valid, config.grm.valid_users, config.seed)
  params, state = stage.fit(params, split.train, selection, stage.grm_cfg.loop,
                            os.path.join(workdir, "checkpoints", "pit"))
  timer.lap("grm_train")
  final = stage.table(params)
  write_identifiers_csv(os.path.join(workdir, "identifiers.csv"), final, inter.item_ids)
  results["index"] = {"identifiers": len(final.codes),
                      "identifiers_per_item": len(final.codes) / split.num_items,
                      "items_with_several": float(np.mean(
                          np.bincount(final.item, minlength=split.num_items) > 1)),
                      "duplicates": final.duplicates()}
  results["metrics"] = {"valid": stage.evaluate(params, selection),
                        "valid_users": len(selection),
                        "test": stage.evaluate(params, split.test),
                        "best_epoch": state["best_epoch"] + 1, "epochs_run": state["epoch"] + 1}
  results["grm_history"] = state["history"]
  timer.lap("grm_eval")
  logging.info("[pit] test %s", stages.fmt(results["metrics"]["test"]))
  return stages.finish(results, timer, workdir)


def continual(run, base_params, base_table: IdentifierTable) -> dict:
  """The `pit` row of the continual protocol (PROTOCOLS.md section 2; DACT's table), for a
  `methods.dact.ContinualRun` after its period 0.

  The generator is warm-started once on period 0's identifiers (the collaborative tokenizer's,
  shared by every row) and the recommender starts from period 0's T5. Each period t >= 1: the
  catalog's new items get the generator's identifiers (`CoEvolution.extend`), co-evolution
  runs on D_t with the fine-tuning budget of the FT rows (continual.finetune_epochs,
  finetune_eval_every, patience), the index refreshed on its schedule, and the period's test
  users are ranked over the index. Code change compares the items' primaries of consecutive
  periods; "seconds" holds the whole period (the tokenizer is trained within it, so
  tokenizer_seconds is the warm start, in period 1)."""
  config, c = run.config, run.config.continual
  stage = CoEvolution(config, base_table, run.features, run.num_items, run.mesh)
  start = time.time()
  params, warm = stage.warm_start(run.ckpt_dir("pit", "warm_start"))
  warm_seconds = time.time() - start
  params = stage.with_recommender(params, run.recommender.trainer.merge(base_params))
  out_dir = os.path.join(run.workdir, "pit")
  previous, rows = base_table, []
  for t in range(1, len(run.periods)):
    period = run.periods[t]
    start = time.time()
    stage.active = np.isin(np.arange(run.num_items), period.catalog)
    params, extended = stage.extend(params)
    loop_cfg = stages.epoch_loop(config, c.finetune_epochs, c.finetune_eval_every, c.patience,
                                 seed=config.seed + t)
    params, state = stage.fit(params, period.train,
                              subsample(period.valid, config.grm.valid_users, config.seed),
                              loop_cfg, run.ckpt_dir("pit", f"period_{t}"))
    seconds = time.time() - start + (warm_seconds if t == 1 else 0.0)
    table = stage.table(params)
    primary = primary_table(table, run.num_items)

    def row():
      return {"period": t, **run.period_metrics(stage.rank(params, period.test), t),
              "code_change": reassign.code_change_rates(previous, primary),
              "seconds": seconds, "tokenizer_seconds": warm_seconds if t == 1 else 0.0,
              "grm_seconds": seconds - (warm_seconds if t == 1 else 0.0),
              "identifiers": {"items": int(len(primary.codes)),
                              "identifiers": int(len(table.codes)),
                              "duplicates": table.duplicates(),
                              "max_dedup_digit": int(table.codes[:, -1].max())},
              "identifiers_added_at_start": extended["added"], "history": state["history"]}

    result = dact.cached_row(os.path.join(out_dir, f"period_{t}", "result.json"), row)
    write_identifiers_csv(os.path.join(out_dir, f"period_{t}", "identifiers.csv"), table,
                          run.inter.item_ids)
    logging.info("[pit] period %d test %s | primary code change %.3f", t,
                 stages.fmt({k: v for k, v in result["test"].items() if k.endswith("@10")}),
                 result["code_change"]["overall"])
    rows.append(result)
    previous = primary
  return {"rules": {"tokenizer": "pit", "identifiers": "one-to-many index",
                    "recommender": "co-evolution"}, "warm_start": warm, "periods": rows}
