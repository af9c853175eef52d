"""Makes the Qwen2 test fixtures: tiny random checkpoints saved by `transformers`, with the
logits `transformers` computes for a few prompts (tests/fixtures/qwen2_*/).

Needs torch and transformers, which the library and CI do not install; run it in a separate
environment, once, and commit its output (a few hundred KB):

    python3 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install --index-url https://download.pytorch.org/whl/cpu torch
    /tmp/torchenv/bin/pip install transformers safetensors numpy
    /tmp/torchenv/bin/python tools/make_qwen2_fixture.py --out=tests/fixtures
    python tools/make_qwen2_fixture.py --tokenizer_only  # in the project's environment

Two checkpoints:
- `qwen2_untied`: float32 weights, separate output layer, and a small word-level
  `tokenizer.json` (the prompt's words) with `tokenizer_config.json`;
- `qwen2_tied_bf16`: bfloat16 weights, output layer tied to the embedding (as Qwen2.5-1.5B);
  its logits are computed in float32 by the checkpoint loaded back with dtype float32.
Every weight, the biases and norm scales included, is drawn at random (HF initialises biases
to zero and norms to one, which would not test them). `logits.npz` holds `tokens` int [3, T],
`mask` bool [3, T] (row 1 left-padded, row 2 padded in the middle), `positions` (HF's
position ids for padded rows: real tokens counted) and `logits` float32 [3, T, V].
"""

import argparse
import json
import os
import sys

import numpy as np


def build(out: str, tied: bool, dtype: str, seed: int) -> None:
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  torch.manual_seed(seed)
  cfg = transformers.Qwen2Config(
      vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
      rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=tied,
      use_sliding_window=False)
  model = transformers.Qwen2ForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.2 * torch.randn_like(p))
  model = model.to(getattr(torch, dtype))
  os.makedirs(out, exist_ok=True)
  model.save_pretrained(out, safe_serialization=True)
  # The logits come from the saved checkpoint loaded back in float32 (bf16 weights upcast
  # exactly; the rotary frequencies recomputed in float32, not cast to bf16 and back).
  model = transformers.Qwen2ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()

  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, cfg.vocab_size, (3, 10))
  mask = np.ones((3, 10), bool)
  mask[1, :4] = False  # left padding
  mask[2, 5:7] = False  # padding inside the row
  tokens[~mask] = 0
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  # A 4-d boolean mask: causal over real keys (each padding query sees itself only).
  t = tokens.shape[1]
  causal = np.tril(np.ones((t, t), bool))
  attend = (causal[None] & mask[:, None, :]) | np.eye(t, dtype=bool)[None]
  bias = torch.where(torch.from_numpy(attend)[:, None], 0.0, torch.finfo(torch.float32).min)
  with torch.no_grad():
    logits = model(input_ids=torch.from_numpy(tokens), attention_mask=bias,
                   position_ids=torch.from_numpy(positions)).logits.numpy()
  np.savez(os.path.join(out, "logits.npz"), tokens=tokens.astype(np.int32), mask=mask,
           positions=positions.astype(np.int32), logits=logits.astype(np.float32))
  with open(os.path.join(out, "versions.json"), "w") as f:
    json.dump({"torch": torch.__version__, "transformers": transformers.__version__}, f)


def write_tokenizer(out: str, vocab_size: int) -> None:
  """A small word-level tokenizer.json (the words of LC-Rec's prompt, within the fixture's
  vocabulary) and a tokenizer_config.json naming its end-of-sequence token, so that the
  tests read a checkpoint's tokenizer the way a real one is read."""
  import tokenizers
  from tokenizers import models, pre_tokenizers
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from genrec_jax.recommenders.lcrec import PROMPTS
  pre = pre_tokenizers.Whitespace()
  words = sorted({w for text in PROMPTS["lcrec"]
                  for w, _ in pre.pre_tokenize_str(text)})
  vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
  vocab["<|im_end|>"] = len(vocab)
  assert len(vocab) <= vocab_size, len(vocab)
  tokenizer = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tokenizer.pre_tokenizer = pre
  tokenizer.save(os.path.join(out, "tokenizer.json"))
  with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump({"eos_token": "<|im_end|>"}, f)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="tests/fixtures")
  parser.add_argument("--tokenizer_only", action="store_true",
                      help="write the tokenizer files only (no torch needed: the project's "
                           "environment has `tokenizers`)")
  args = parser.parse_args()
  if not args.tokenizer_only:
    build(os.path.join(args.out, "qwen2_untied"), tied=False, dtype="float32", seed=0)
    build(os.path.join(args.out, "qwen2_tied_bf16"), tied=True, dtype="bfloat16", seed=1)
  write_tokenizer(os.path.join(args.out, "qwen2_untied"), vocab_size=96)


if __name__ == "__main__":
  main()
