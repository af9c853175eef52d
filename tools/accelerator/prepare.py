"""Builds the accelerator bundle: everything a run on the lent GPU machine reads.

The GPU machine reaches no network and lacks ml-collections and the MiniLM weights package
(`tools/accelerator/README.md`). Run here, from the project root with the project's venv
active:

  python tools/accelerator/prepare.py            # -> .accelerator/ (git-ignored)

The bundle holds, per dataset, the interactions file and the item-text vectors as float16 .npy
(rows in the library's item order, read with `embeddings.source=file`), and the wheels of the
pure-Python packages the machine lacks. It prints the command to run there
(`tools/accelerator/run.py`). The vectors come from the MiniLM cache when a run has embedded
the dataset before, else they are computed (about 3 minutes per dataset on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

import numpy as np

BUNDLE = ".accelerator"
BUNDLE_LIMIT_BYTES = 64 * 2**20  # what travels to the device machine, the code included
WHEELS = ("ml-collections==1.1.0",)  # pure Python; absent from the GPU machine's image
DATASETS = ("toys", "beauty")


def dataset_dir(bundle: str, name: str) -> str:
  return os.path.join(bundle, "data", name)


def add_dataset(bundle: str, name: str, interactions_path: str, vectors: np.ndarray) -> None:
  """Copies a dataset's interactions file and saves its item vectors [num_items, D] (float16,
  half the bytes; the tokenizer reads them as float32) into the bundle."""
  if vectors.ndim != 2 or not np.isfinite(vectors).all():
    raise ValueError(f"{name}: item vectors must be a finite 2-D array, got shape "
                     f"{vectors.shape}")
  out = dataset_dir(bundle, name)
  os.makedirs(out, exist_ok=True)
  shutil.copyfile(interactions_path, os.path.join(out, "interactions.csv"))
  np.save(os.path.join(out, "item_vectors.npy"), vectors.astype(np.float16))


def shared_dataset_vectors(name: str) -> tuple[str, np.ndarray]:
  """(interactions path, MiniLM item vectors) of a shared Amazon 2014 dataset, computed the
  way a run computes them (`stages.item_features` over the k-core filtered item set)."""
  from genrec_jax.config import method_config
  from genrec_jax.data.interactions import load_interactions
  from genrec_jax.stages import item_features
  config = method_config("tiger", name, "cpu")
  inter = load_interactions(config.data.path, config.data.format, config.data.min_count)
  return config.data.path, item_features(config, inter.item_ids, None)


def download_wheels(bundle: str, requirements=WHEELS) -> None:
  """Pure-Python wheels (no dependencies) of `requirements` into BUNDLE/wheels."""
  out = os.path.join(bundle, "wheels")
  os.makedirs(out, exist_ok=True)
  subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                  "--only-binary=:all:", "-d", out, *requirements], check=True)


def bundle_bytes(bundle: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(bundle)
             for f in files)


def check_size(bundle: str) -> int:
  """The bundle's size in bytes; an error when it alone exceeds the device machine's limit."""
  size = bundle_bytes(bundle)
  if size > BUNDLE_LIMIT_BYTES:
    raise SystemExit(f"error: {bundle} holds {size / 2**20:.1f} MiB, over the "
                     f"{BUNDLE_LIMIT_BYTES / 2**20:.0f} MiB that travel to the device machine; "
                     f"bundle fewer datasets (--datasets)")
  return size


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--bundle", default=BUNDLE, help="bundle folder (relative to the root)")
  parser.add_argument("--datasets", default=",".join(DATASETS),
                      help="shared Amazon 2014 datasets to bundle, comma-separated")
  args = parser.parse_args()
  if not os.path.isdir(".git"):
    raise SystemExit("error: run prepare.py from the project root (the folder holding .git)")
  for name in filter(None, args.datasets.split(",")):
    path, vectors = shared_dataset_vectors(name)
    add_dataset(args.bundle, name, path, vectors)
    print(f"{name}: {vectors.shape[0]} items x {vectors.shape[1]}")
  download_wheels(args.bundle)
  size = check_size(args.bundle)
  print(f"{args.bundle}: {size / 2**20:.1f} MiB. On the GPU machine, from the project root "
        f"(device tool: carry [{args.bundle!r}]):\n"
        f"  python3 tools/accelerator/run.py --bundle={args.bundle} --out=$OUT")


if __name__ == "__main__":
  main()
