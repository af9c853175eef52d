"""The PyTorch reference (DACT / LETTER setup): HF T5ForConditionalGeneration trained with
teacher forcing on batches padded to a fixed length, and HF generate with a dict trie."""

from __future__ import annotations

import collections

import numpy as np

from genrec_jax.recommenders.t5 import T5Config

from tools.bench.harness import real_rows
from tools.bench.jax_side import host_tokens

def torch_available() -> tuple[bool, str]:
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
  except Exception as e:  # pylint: disable=broad-except
    return False, f"{type(e).__name__}: {e}"
  return True, ""


def make_torch_model(cfg: T5Config, threads: int):
  """HF T5ForConditionalGeneration of the same size (DACT/LETTER/TIGER setup)."""
  import torch
  import transformers
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  hf_cfg = transformers.T5Config(
      vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_ff=cfg.d_ff, num_heads=cfg.num_heads,
      d_kv=cfg.d_kv, num_layers=cfg.num_encoder_layers,
      num_decoder_layers=cfg.num_decoder_layers, dropout_rate=cfg.dropout_rate,
      relative_attention_num_buckets=cfg.relative_buckets,
      relative_attention_max_distance=cfg.relative_max_distance, feed_forward_proj="relu",
      tie_word_embeddings=True, decoder_start_token_id=0, pad_token_id=0, eos_token_id=None)
  model = transformers.T5ForConditionalGeneration(hf_cfg)
  gen = model.generation_config
  gen.eos_token_id, gen.pad_token_id, gen.decoder_start_token_id = None, 0, 0
  return model


def pad_to(inputs: np.ndarray, length: int) -> np.ndarray:
  """Left-pads token rows to `length` (histories are left-padded, most recent item last)."""
  return np.pad(inputs, ((0, 0), (length - inputs.shape[1], 0)))


class TorchTrain:
  """Teacher-forced training with AdamW (+ clipping if set) on batches padded to a fixed length."""

  def __init__(self, model, item_tokens, lr, weight_decay, grad_clip, full_len):
    import torch
    self.torch, self.model, self.item_tokens = torch, model, item_tokens
    self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    self.grad_clip, self.full_len = grad_clip, full_len

  def step(self, batch, idx) -> int:
    torch = self.torch
    self.model.train()
    inputs = host_tokens(batch["history"], self.item_tokens)
    inputs = torch.from_numpy(pad_to(inputs, self.full_len).astype(np.int64))
    labels = torch.from_numpy(host_tokens(batch["target"][:, None], self.item_tokens)
                              .astype(np.int64))
    labels[torch.from_numpy(idx < 0)] = -100
    out = self.model(input_ids=inputs, attention_mask=(inputs > 0).long(), labels=labels)
    out.loss.backward()
    if self.grad_clip > 0:  # 0 = no clipping, as the JAX trainer
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    self.loss = out.loss.item()
    return real_rows(idx)


def dict_trie(table) -> dict[tuple[int, ...], list[int]]:
  """{prefix tokens: allowed next tokens}, the usual prefix_allowed_tokens_fn trie."""
  trie: dict[tuple[int, ...], set[int]] = collections.defaultdict(set)
  for row in table.tokens().tolist():
    for d in range(len(row)):
      trie[tuple(row[:d])].add(row[d])
  return {k: sorted(v) for k, v in trie.items()}


class TorchGenerate:
  """HF generate(num_beams=B, num_return_sequences=B, prefix_allowed_tokens_fn=<dict trie>)."""

  def __init__(self, model, table, beam, full_len):
    import torch
    self.torch, self.model, self.beam, self.full_len = torch, model, beam, full_len
    self.depth = table.depth
    self.trie = dict_trie(table)
    self.output_shape = None

  def allowed(self, batch_id, sent):  # sent: decoder start token 0, then generated tokens
    return self.trie.get(tuple(sent.tolist()[1:]), [])

  def generate(self, inputs: np.ndarray) -> int:
    torch = self.torch
    self.model.eval()
    x = torch.from_numpy(pad_to(inputs, self.full_len).astype(np.int64))
    with torch.inference_mode():
      out = self.model.generate(
          input_ids=x, attention_mask=(x > 0).long(), num_beams=self.beam,
          num_return_sequences=self.beam, max_new_tokens=self.depth, min_new_tokens=self.depth,
          do_sample=False, early_stopping=False, prefix_allowed_tokens_fn=self.allowed,
          decoder_start_token_id=0, pad_token_id=0, eos_token_id=None)
    self.output_shape = list(out.shape)
    return inputs.shape[0]
