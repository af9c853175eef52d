"""The accelerator suite (tools/accelerator): the bundle and the GPU command, run here on CPU."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import write_synthetic
from tools.accelerator.prepare import BUNDLE_LIMIT_BYTES, add_dataset, check_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The smoke preset on the 48-item synthetic catalog: codebooks it can fill, and one history
# bucket (histories of up to 7 items) so that the test compiles one train and one search step.
SYNTHETIC = ("--set=tokenizer.codebook_size=8", "--set=tokenizer.dedup_size=16",
             "--set=grm.length_buckets=(8,)")


def _bundle(tmp_path) -> str:
  csv_path, npy_path = write_synthetic(str(tmp_path))
  bundle = str(tmp_path / "bundle")
  add_dataset(bundle, "toys", csv_path, np.load(npy_path))
  return bundle


def _suite(bundle, out, *flags):
  return subprocess.run([sys.executable, "tools/accelerator/run.py", f"--bundle={bundle}",
                         f"--out={out}", *flags], cwd=ROOT, capture_output=True, text=True,
                        timeout=900)


def test_smoke_suite_runs_end_to_end_and_reports(tmp_path):
  out = tmp_path / "out"
  proc = _suite(_bundle(tmp_path), out, "--suite=smoke", "--budget_minutes=10",
                *SYNTHETIC)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  summary = json.loads((out / "summary.json").read_text())
  assert summary["environment"]["backend"] == "cpu"
  [run] = summary["runs"]
  assert run["status"] == "ok" and run["seconds"] > 0
  test = run["results"]["metrics"]["test"]
  assert 0.0 <= test["ndcg@10"] <= test["recall@10"] <= 1.0
  assert "embeddings.source=file" in run["command"]
  assert (out / "tiger_smoke.log").stat().st_size > 0
  assert len(list(out.iterdir())) <= 8  # what the device tool brings back


def test_runs_that_do_not_fit_the_budget_are_skipped(tmp_path):
  out = tmp_path / "out"
  proc = _suite(_bundle(tmp_path), out, "--suite=paper", "--budget_minutes=0.5")
  assert proc.returncode == 0, proc.stderr[-3000:]
  runs = json.loads((out / "summary.json").read_text())["runs"]
  assert [r["status"] for r in runs] == ["skipped"] * 3
  assert "left" in runs[0]["reason"]


def test_a_failing_first_run_stops_the_suite(tmp_path):
  out = tmp_path / "out"
  proc = _suite(_bundle(tmp_path), out, "--suite=smoke", "--budget_minutes=10",
                "--set=tokenizer.codebook_size=-1")
  assert proc.returncode == 1
  [run] = json.loads((out / "summary.json").read_text())["runs"]
  assert run["status"] == "failed" and run["results"] is None
  assert "codebook_size" in (out / "tiger_smoke.log").read_text()


def test_bundle_checks(tmp_path):
  with pytest.raises(ValueError, match="finite 2-D"):
    add_dataset(str(tmp_path), "toys", __file__, np.full((3, 2), np.nan))
  big = tmp_path / "big"
  big.mkdir()
  (big / "vectors.npy").write_bytes(b"\0" * (BUNDLE_LIMIT_BYTES + 1))
  with pytest.raises(SystemExit, match="over the 64 MiB"):
    check_size(str(big))
