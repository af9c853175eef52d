"""LC-Rec: a decoder-only LLM (Qwen2) with LoRA over prompts made of item identifiers.

The recommender of DACT Table 3 (LC-Rec, Zheng et al. 2024; DACT fine-tunes
Qwen2.5-1.5B-Instruct): every identifier symbol becomes one token added to the LLM's vocabulary
(LC-Rec's `<a_12>`, `<b_3>`, ... ; here ids V .. V + N - 1 after the base vocabulary of V), the
history is written into an instruction prompt as those tokens, and the model generates the
target's identifier as the response.

Prompt (LC-Rec `prompt.py`, sequential-recommendation template 0, Alpaca-style wrapper):

    Below is an instruction that describes a task. Write a response that appropriately
    completes the request.\\n\\n### Instruction:\\nThe user has interacted with items
    {i_1}, {i_2}, ..., {i_n} in chronological order. Can you predict the next possible item
    that the user may expect?\\n\\n### Response:{target}<eos>

where each {i} is an item's identifier tokens (`PROMPTS["lcrec"]`; `"identifiers"` is a short
prompt for random backbones). The fixed text pieces are tokenized once
(`PromptTokens`); the prompt of a batch is assembled on the device from item indices
(`training.lcrec.prompt_inputs`), so the identifier map is looked up inside the compiled step.

Trainable parts (`LCRec`): LoRA adapters on the attention and MLP projections
(`recommenders.lora`, LC-Rec's r 8, alpha 32, dropout 0.05 on q/k/v/o/gate/up/down) and the
rows of the added identifier tokens (`identifiers`: input rows and, for an untied output layer,
output rows). The base weights stay frozen. LC-Rec's code trains full copies of the embedding
and output layer (PEFT `modules_to_save`); that is `train_vocabulary=True` of the trainer, off by
default (the issue's and the paper's setting: the new tokens' rows train). New rows are drawn
from normal(0, initializer_range), as `resize_token_embeddings` did in the transformers
releases LC-Rec used (newer releases start them at the mean of the old rows).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import zlib

import jax
import jax.numpy as jnp
from flax import nnx

from genrec_jax.recommenders.lora import LoRAConfig, apply_lora
from genrec_jax.recommenders.qwen2 import Qwen2
from genrec_jax.recommenders.t5 import contract

# The fixed text of each prompt kind: (before the history, between items, after the history).
PROMPTS = {
    # LC-Rec's sequential-recommendation prompt (the default).
    "lcrec": ("Below is an instruction that describes a task. Write a response that "
              "appropriately completes the request.\n\n### Instruction:\nThe user has "
              "interacted with items ",
              ", ",
              " in chronological order. Can you predict the next possible item that the user "
              "may expect?\n\n### Response:"),
    # The history's identifiers alone between two markers: for a randomly initialised
    # backbone, to which the instruction means nothing and which spends most of its compute
    # on it (the cpu presets; about a third of the tokens).
    "identifiers": ("History:", "", " Next:"),
}


@dataclasses.dataclass(frozen=True)
class PromptTokens:
  """Token ids of the prompt's fixed text: before the history, between two history items,
  after the history (ending just before the response), and the end-of-sequence token that
  closes the response."""

  prefix: tuple[int, ...]
  separator: tuple[int, ...]  # may be empty
  suffix: tuple[int, ...]
  eos: int

  def __post_init__(self):
    if not self.prefix or not self.suffix:
      raise ValueError("the prompt needs a non-empty prefix and suffix")


def _prompt_text(kind: str) -> tuple[str, str, str]:
  if kind not in PROMPTS:
    raise ValueError(f"unknown prompt {kind!r}; one of {tuple(PROMPTS)}")
  return PROMPTS[kind]


def word_prompt_tokens(vocab_size: int, kind: str = "lcrec") -> PromptTokens:
  """The prompt's text for a randomly initialised backbone, which has no tokenizer: one token
  per word (a word with its leading space, a run of punctuation, a run of white space, the way
  BPE pre-tokenizers cut text), id 1 + crc32(piece) mod (V - 2), the last id V - 1 as eos.
  The prompt then has about the length it has under Qwen2's tokenizer (the compute of a run),
  and the model learns the ids like any others."""
  if vocab_size < 4:
    raise ValueError(f"a backbone vocabulary of {vocab_size} tokens cannot hold a prompt")

  def encode(text: str) -> tuple[int, ...]:
    return tuple(1 + zlib.crc32(piece.encode("utf-8")) % (vocab_size - 2)
                 for piece in re.findall(r" ?\w+| ?[^\w\s]+|\s+", text))

  return PromptTokens(*map(encode, _prompt_text(kind)), eos=vocab_size - 1)


def checkpoint_prompt_tokens(directory: str, kind: str = "lcrec") -> PromptTokens:
  """The prompt tokenized by a checkpoint's own tokenizer (`tokenizer.json`, read with the
  `tokenizers` package) and its end-of-sequence token (`tokenizer_config.json`'s eos_token).

  Pieces are tokenized separately; a tokenizer splits text at added tokens (the identifier
  tokens) before its BPE, so this equals tokenizing the whole prompt."""
  import tokenizers  # pylint: disable=import-outside-toplevel  (here: absent on device images)
  path = os.path.join(directory, "tokenizer.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: the checkpoint directory needs its tokenizer")
  tokenizer = tokenizers.Tokenizer.from_file(path)
  with open(os.path.join(directory, "tokenizer_config.json")) as f:
    eos = json.load(f)["eos_token"]
  eos = eos["content"] if isinstance(eos, dict) else eos
  eos_id = tokenizer.token_to_id(eos)
  if eos_id is None:
    raise ValueError(f"eos token {eos!r} of {directory} is not in its tokenizer.json")

  def encode(text: str) -> tuple[int, ...]:
    return tuple(tokenizer.encode(text, add_special_tokens=False).ids)

  return PromptTokens(*map(encode, _prompt_text(kind)), eos=eos_id)


class IdentifierRows(nnx.Module):
  """Embedding (and, for an untied output layer, output) rows of the added identifier tokens,
  [N, d] each."""

  def __init__(self, count: int, dim: int, std: float, tied: bool, rngs: nnx.Rngs):
    init = nnx.initializers.normal(std)
    self.embedding = nnx.Param(init(rngs.params(), (count, dim), jnp.float32))
    self.output = None if tied else nnx.Param(init(rngs.params(), (count, dim), jnp.float32))


class LCRec(nnx.Module):
  """A Qwen2 backbone with LoRA adapters and `num_identifier_tokens` added tokens.

  Token ids below `base_vocab` are the backbone's; id base_vocab + j is identifier token j.
  """

  def __init__(self, backbone: Qwen2, num_identifier_tokens: int, lora: LoRAConfig, *,
               rngs: nnx.Rngs):
    apply_lora(backbone, lora, rngs)
    self.backbone = backbone
    cfg = backbone.cfg
    self.base_vocab = cfg.vocab_size
    self.identifiers = IdentifierRows(num_identifier_tokens, cfg.hidden_size,
                                      cfg.initializer_range, cfg.tie_word_embeddings, rngs)

  @property
  def vocab_size(self) -> int:
    return self.base_vocab + self.identifiers.embedding.shape[0]

  def embed(self, tokens: jax.Array) -> jax.Array:
    """Input vectors [..., d] of token ids [...] of the extended vocabulary."""
    base = self.backbone.embed_tokens(jnp.minimum(tokens, self.base_vocab - 1))
    rows = self.identifiers.embedding[...][jnp.clip(tokens - self.base_vocab, 0)]
    added = (tokens >= self.base_vocab)[..., None]
    return jnp.where(added, rows.astype(base.dtype), base)

  def logits(self, h: jax.Array) -> jax.Array:
    """States [..., d] -> float32 logits [..., base_vocab + N] over the extended vocabulary."""
    rows = (self.identifiers.embedding if self.identifiers.output is None
            else self.identifiers.output)[...]
    added = contract("...d,nd->...n", h, rows, self.backbone.cfg.dtype)
    return jnp.concatenate([self.backbone.logits(h), added.astype(jnp.float32)], axis=-1)

  def states(self, tokens, positions, mask, cache=None, key=None):
    """`Qwen2.states` of token ids [B, T] of the extended vocabulary."""
    return self.backbone.states(self.embed(tokens), positions, mask, cache, key)
