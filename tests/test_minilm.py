"""Flax MiniLM port vs. the PyTorch sentence-transformers reference, item texts, cache, user files."""

import json
from pathlib import Path

import numpy as np
import pytest

from genrec_jax.text import minilm

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURE = SHARED / "reference" / "fixtures" / "minilm_reference.json"
TOYS_CSV = SHARED / "data" / "amazon2014" / "toys" / "items.csv"


@pytest.fixture(scope="module")
def reference():
  if not FIXTURE.is_file():
    pytest.skip(f"shared reference fixture not found at {FIXTURE}")
  return json.loads(FIXTURE.read_text())


def test_matches_sentence_transformers_reference(reference):
  got = minilm.encode_texts(reference["sentences"], max_length=reference["max_seq_length"])
  want = np.asarray(reference["embeddings"], np.float32)
  assert got.shape == want.shape == (4, 384) and got.dtype == np.float32
  assert np.abs(got - want).max() <= 2e-5
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_batching_and_order_do_not_change_vectors(reference):
  sentences = reference["sentences"]
  full = minilm.encode_texts(sentences)
  reordered = minilm.encode_texts(sentences[::-1], batch_size=3)[::-1]
  np.testing.assert_allclose(reordered, full, atol=1e-5)


def test_item_text_recipe_on_toys(reference):
  if not TOYS_CSV.is_file():
    pytest.skip(f"toys items.csv not found at {TOYS_CSV}")
  (text,) = minilm.item_texts(str(TOYS_CSV), ["0439893577"])
  # The fixture sentence is "<title>. <categories>" with the category path cut after two levels.
  assert text.startswith(reference["sentences"][1])
  assert text == ("Little Red Tool Box: Magnetic Tabletop Learning Easel. Toys & Games > "
                  "Dress Up & Pretend Play > Pretend Play > Magnet & Felt Playboards")


def _write_csv(path, rows, header="item,title,categories"):
  path.write_text("\n".join([header] + rows) + "\n")
  return str(path)


def test_item_texts_rules_and_errors(tmp_path):
  csv_path = _write_csv(tmp_path / "items.csv",
                        ['a,"Game, Deluxe",Toys > Games', "b,,Toys", "c,Title,", "d,,"])
  assert minilm.item_texts(csv_path, ["d", "c", "b", "a"]) == [
      "", "Title", "Toys", "Game, Deluxe. Toys > Games"]
  with pytest.raises(ValueError, match=r"items\.csv.*not found.*'zz'"):
    minilm.item_texts(csv_path, ["a", "zz"])
  bad = _write_csv(tmp_path / "bad.csv", ["a,x"], header="item,title")
  with pytest.raises(ValueError, match=r"bad\.csv: missing column 'categories'"):
    minilm.item_texts(bad, ["a"])


def test_semantic_embeddings_cache_round_trip(tmp_path, monkeypatch):
  csv_path = _write_csv(tmp_path / "items.csv", ["a,Red ball,Toys", "b,Blue car,Toys > Cars"])
  cache = tmp_path / "cache"
  first = minilm.semantic_embeddings(csv_path, ["b", "a"], str(cache))
  assert first.shape == (2, 384)
  assert [p.suffix for p in cache.iterdir()] == [".npy"]  # no temp file left behind

  def fail(*args, **kwargs):
    raise AssertionError("cache miss: encode_texts called again")

  monkeypatch.setattr(minilm, "encode_texts", fail)
  np.testing.assert_array_equal(minilm.semantic_embeddings(csv_path, ["b", "a"], str(cache)), first)
  with pytest.raises(AssertionError, match="cache miss"):  # another order is another key
    minilm.semantic_embeddings(csv_path, ["a", "b"], str(cache))


def test_load_embedding_file(tmp_path):
  good = tmp_path / "emb.npy"
  np.save(good, np.ones((3, 4)))
  assert minilm.load_embedding_file(str(good), 3).dtype == np.float32
  with pytest.raises(ValueError, match=r"emb\.npy: expected 5 rows.*got 3"):
    minilm.load_embedding_file(str(good), 5)
  nan = tmp_path / "nan.npy"
  arr = np.ones((3, 4))
  arr[1, 2] = np.nan
  np.save(nan, arr)
  with pytest.raises(ValueError, match=r"nan\.npy: 1 rows contain NaN"):
    minilm.load_embedding_file(str(nan), 3)
  flat = tmp_path / "flat.npy"
  np.save(flat, np.ones(3))
  with pytest.raises(ValueError, match=r"flat\.npy: expected a 2-D"):
    minilm.load_embedding_file(str(flat), 3)
  with pytest.raises(ValueError, match=r"emb\.csv: unknown embedding file extension"):
    minilm.load_embedding_file(str(tmp_path / "emb.csv"), 3)


def test_load_embedding_parquet(tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  listed = tmp_path / "listed.parquet"
  pq.write_table(pa.table({"embedding": [[1.0, 2.0], [3.0, 4.0]]}), listed)
  np.testing.assert_array_equal(minilm.load_embedding_file(str(listed), 2), [[1, 2], [3, 4]])
  wide = tmp_path / "wide.parquet"
  pq.write_table(pa.table({"id": ["a", "b"], "x": [1.0, 3.0], "y": [2, 4]}), wide)
  np.testing.assert_array_equal(minilm.load_embedding_file(str(wide), 2), [[1, 2], [3, 4]])


def test_load_minilm_reports_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    minilm.load_minilm(str(tmp_path))
