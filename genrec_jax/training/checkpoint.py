"""Orbax checkpoints with named items, and loud failures on mismatch.

Each training stage keeps its own `CheckpointManager` under `workdir/checkpoints/<stage>` with
named items (for example `params`, `opt_state`, `best_params`, `meta`). Restoring uses the
current model's abstract state as target, so a checkpoint of another architecture or size
raises `CheckpointMismatchError` naming the item instead of loading something silently.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


class CheckpointMismatchError(RuntimeError):
  """A stored checkpoint does not fit the model being restored."""


def _path_name(path) -> str:
  """'a/b/0/c' for a pytree key path, ignoring NNX's trailing `value` wrapper."""
  parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
  return "/".join(parts[:-1] if parts and parts[-1] == "value" else parts)


def _tree_signature(tree) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_name(path): (tuple(leaf.shape), str(leaf.dtype)) for path, leaf in flat}


class Checkpoints:
  """Thin wrapper over `ocp.CheckpointManager` for pytree items plus a JSON `meta` item."""

  def __init__(self, directory: str, item_names: tuple[str, ...], max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self.item_names = tuple(item_names)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=False),
        item_handlers={**{name: ocp.StandardCheckpointHandler() for name in self.item_names},
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, items: dict[str, Any], meta: dict) -> None:
    """Saves `items` (some or all of `item_names`) and `meta` as checkpoint `step`."""
    unknown = sorted(set(items) - set(self.item_names))
    if unknown:
      raise ValueError(f"{self.directory}: items {unknown} are not among {self.item_names}")
    args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
    args["meta"] = ocp.args.JsonSave(meta)
    self.manager.save(step, args=ocp.args.Composite(**args), force=True)
    self.manager.wait_until_finished()

  def stored_items(self, step: int) -> tuple[str, ...]:
    """The items of `item_names` that checkpoint `step` holds."""
    stored = self.manager.item_metadata(step)
    return tuple(name for name in self.item_names if stored.get(name) is not None)

  def restore(self, step: int, targets: dict[str, Any]) -> tuple[dict[str, Any], dict]:
    """Restores `targets`' items (some or all of `item_names`, each of the stored structure,
    shapes and dtypes) at `step`, plus meta."""
    stored = self.manager.item_metadata(step)
    for name in targets:
      want = _tree_signature(jax.eval_shape(lambda t: t, targets[name]))
      have_meta = stored.get(name)
      if have_meta is None:
        raise CheckpointMismatchError(f"{self.directory} step {step} has no item {name!r}")
      have = {k: (tuple(v.shape), str(v.dtype)) for k, v in _stored_leaves(have_meta)}
      if have != want:
        missing = sorted(set(want) - set(have))[:3]
        extra = sorted(set(have) - set(want))[:3]
        wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])[:3]
        raise CheckpointMismatchError(
            f"checkpoint {self.directory} step {step} item {name!r} does not match the model: "
            f"missing {missing}, unexpected {extra}, shape/dtype differs for "
            f"{[(k, have[k], want[k]) for k in wrong]}")
    args = {name: ocp.args.StandardRestore(jax.eval_shape(lambda t: t, target))
            for name, target in targets.items()}
    args["meta"] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    return {name: restored[name] for name in targets}, restored["meta"]

  def close(self) -> None:
    self.manager.close()


def _stored_leaves(metadata):
  """(name, array metadata) pairs of a stored item's metadata tree."""
  flat = jax.tree_util.tree_flatten_with_path(
      metadata, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))[0]
  return [(_path_name(path), leaf) for path, leaf in flat]


def restore_or_run(directory: str, templates: dict[str, Any], run) -> tuple[dict[str, Any], dict]:
  """A pipeline stage computed once: restored from `directory` when a run already saved it,
  else `run()` -> (items, meta) is called and saved there.

  templates: item name -> a pytree of the item's structure, shapes and dtypes (the current
  model's state), the restore target; a stored item that does not match raises
  `CheckpointMismatchError`. meta: a JSON-serialisable dict stored beside the items (stage
  statistics, timings). Returns (items, meta), restored or computed.
  """
  ckpt = Checkpoints(directory, tuple(templates), max_to_keep=1)
  try:
    if ckpt.latest_step() is not None:
      items, meta = ckpt.restore(ckpt.latest_step(), templates)
      logging.info("restored %s", ckpt.directory)
      return items, meta
    items, meta = run()
    ckpt.save(0, items, meta)
    return items, meta
  finally:
    ckpt.close()
