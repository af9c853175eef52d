"""Loading a local Hugging Face Qwen2 checkpoint directory into `recommenders.qwen2.Qwen2`.

A checkpoint directory holds `config.json` and the weights as safetensors: one
`model.safetensors`, or shards listed by `model.safetensors.index.json`. Nothing is downloaded.
The safetensors files are read here, memory-mapped, rather than with the `safetensors`
package: its NumPy reader has no bfloat16 (the dtype of Qwen2.5 checkpoints), loading a 3 GB
file whole would double the host memory, and the accelerator machine lacks the package. The
format is an 8-byte header length, a JSON header of name -> dtype, shape and byte range, then
the raw little-endian data.

Loading is strict: every parameter of the model must come from exactly one tensor of the
checkpoint with the expected shape, and every tensor of the checkpoint must be used (the
rotary `inv_freq` buffers some exports include are the one exception: they are recomputed;
a tied checkpoint may also carry an `lm_head.weight` equal to its embedding).
Any other difference is a one-line error naming the tensor.

Name mapping (HF -> NNX path): `model.` prefix dropped; `.weight` of a linear layer ->
`kernel` (transposed: HF stores [out, in], the model [in, out]); `.weight` of a norm ->
`scale`; `embed_tokens.weight` -> `embed_tokens.embedding`; `lm_head.weight` -> `lm_head.kernel`
(absent when the embedding is tied).
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from genrec_jax.recommenders.qwen2 import Qwen2, Qwen2Config

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Every tensor of one safetensors file, as read-only arrays memory-mapped from it."""
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) != 8:
      raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header size)")
    size = int.from_bytes(head, "little")
    raw = f.read(size)
    if len(raw) != size:
      raise ValueError(f"{path}: the file ends inside its {size}-byte header (truncated file?)")
    try:
      header = json.loads(raw)
    except ValueError as e:
      raise ValueError(f"{path}: unreadable safetensors header ({e})") from None
  data = np.memmap(path, np.uint8, mode="r", offset=8 + size)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in SAFETENSORS_DTYPES:
      raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
    if end > data.size or (end - begin) != dtype.itemsize * int(np.prod(info["shape"])):
      raise ValueError(f"{path}: tensor {name} has a byte range {begin}..{end} that does not "
                       f"match its shape {info['shape']} or the file size (truncated file?)")
    out[name] = data[begin:end].view(dtype).reshape(info["shape"])
  return out


def read_checkpoint_tensors(directory: str) -> dict[str, np.ndarray]:
  """Every tensor of a checkpoint directory (single file or shards)."""
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  else:
    files = ["model.safetensors"]
  tensors: dict[str, np.ndarray] = {}
  for name in files:
    path = os.path.join(directory, name)
    if not os.path.exists(path):
      raise FileNotFoundError(f"checkpoint file {path} is missing (listed by "
                              f"{os.path.basename(index) if os.path.exists(index) else 'default'})")
    for key, value in read_safetensors(path).items():
      if key in tensors:
        raise ValueError(f"tensor {key} appears in two shards of {directory}")
      tensors[key] = value
  return tensors


def read_config(directory: str, **overrides) -> Qwen2Config:
  """The model config of a checkpoint directory's config.json (`Qwen2Config.from_hf`)."""
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: a checkpoint directory needs config.json and "
                            f"its safetensors weights")
  with open(path) as f:
    return Qwen2Config.from_hf(json.load(f), **overrides)


def hf_name(path: tuple) -> tuple[str, bool]:
  """(HF tensor name, whether the tensor is stored transposed) of a model parameter path."""
  *parts, leaf = [str(p) for p in path]
  prefix = [] if parts[0] == "lm_head" else ["model"]
  weight = "weight" if leaf in ("kernel", "scale", "embedding") else leaf
  return ".".join(prefix + parts + [weight]), leaf == "kernel"


def load_qwen2(directory: str, **overrides) -> Qwen2:
  """The Qwen2 model of a checkpoint directory, every weight from the checkpoint (strict; see
  the module docstring). `overrides` set config fields (dtype, param_dtype)."""
  cfg = read_config(directory, **overrides)
  tensors = read_checkpoint_tensors(directory)
  abstract = nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat = dict(nnx.to_flat_state(state))
  used, values = set(), {}
  for path, variable in flat.items():
    name, transposed = hf_name(path)
    if name not in tensors:
      raise ValueError(f"checkpoint {directory} lacks tensor {name} (model parameter "
                       f"{'/'.join(map(str, path))}, shape {tuple(variable.shape)})")
    array = tensors[name].T if transposed else tensors[name]
    if array.shape != tuple(variable.shape):
      raise ValueError(f"checkpoint tensor {name} has shape {tensors[name].shape}; the config "
                       f"implies {tuple(variable.shape)[::-1] if transposed else variable.shape}")
    values[path] = jnp.asarray(np.asarray(array), dtype=variable.dtype)
    used.add(name)
  if cfg.tie_word_embeddings and "lm_head.weight" in tensors:  # some exports keep the copy
    if not np.array_equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]):
      raise ValueError(f"checkpoint {directory} ties its embeddings (config.json) but has an "
                       f"lm_head.weight that differs from model.embed_tokens.weight")
    used.add("lm_head.weight")
  unexpected = sorted(n for n in tensors if n not in used and not n.endswith(IGNORED_SUFFIXES))
  if unexpected:
    raise ValueError(f"checkpoint {directory} has {len(unexpected)} tensor(s) the model does not "
                     f"use, first {unexpected[0]} (a different architecture or config.json?)")
  return nnx.merge(graphdef, nnx.from_flat_state(
      {path: variable.replace(values[path]) for path, variable in flat.items()}))
