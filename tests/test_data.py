"""Tests of genrec_jax.data: readers, k-core filter, indexing, leave-one-out, TFDS round trip."""

import gzip
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

from genrec_jax.data import (
    DataError,
    Interactions,
    RawInteractions,
    index_interactions,
    k_core_filter,
    leave_one_out,
    load_interactions,
    read_interactions,
)
from genrec_jax.data import tfds_builder

AMAZON = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon2014"
PAPER_STATS = {
    "toys": dict(users=19412, items=11924, interactions=167597),
    "beauty": dict(users=22363, items=12101, interactions=198502),
}

# k=2 chain: item x (1 row) goes, so user u3 (x, c) is left with 1 row and goes, so item c
# (u3, u4) is left with 1 row and goes; u4 keeps a, b. Surviving rows: 0-3, 7, 8.
CHAIN = [
    ("u1", "a", 1), ("u1", "b", 2), ("u2", "a", 1), ("u2", "b", 2), ("u3", "x", 1),
    ("u3", "c", 2), ("u4", "c", 1), ("u4", "a", 2), ("u4", "b", 3),
]  # fmt: skip
CHAIN_KEPT = [0, 1, 2, 3, 7, 8]


def _raw(rows, source="test"):
    users, items, times = zip(*rows)
    return RawInteractions(
        np.asarray(users, dtype=str), np.asarray(items, dtype=str),
        np.asarray(times, dtype=np.int64), source,
    )  # fmt: skip


def _assert_raw_equal(a: RawInteractions, b: RawInteractions):
    for key in ("users", "items", "timestamps"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=key)


def _assert_inter_equal(a: Interactions, b: Interactions):
    for key in ("user", "item", "timestamp", "user_ids", "item_ids"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=key)
    assert a.user.dtype == b.user.dtype and a.timestamp.dtype == b.timestamp.dtype


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _write_formats(tmp_path: Path, rows) -> dict[str, Path]:
    """The same rows as csv (extra column, other order), McAuley JSON (+gz), ratings csv."""
    csv_text = "timestamp,rating,item,user\n" + "".join(
        f"{t},5.0,{i},{u}\n" for u, i, t in rows
    )
    json_text = "".join(
        json.dumps({"reviewerID": u, "asin": i, "overall": 4.0, "unixReviewTime": t}) + "\n"
        for u, i, t in rows
    )
    paths = {
        "csv": _write(tmp_path / "inter.csv", csv_text),
        "mcauley_json": _write(tmp_path / "reviews_5.json", json_text),
        "ratings_csv": _write(
            tmp_path / "ratings.csv", "".join(f"{u},{i},3.0,{t}\n" for u, i, t in rows)
        ),
        "gz": tmp_path / "reviews_5.json.gz",
    }
    with gzip.open(paths["gz"], "wt", encoding="utf-8") as f:
        f.write(json_text)
    return paths


# ---------------------------------------------------------------------------- real data


@pytest.mark.parametrize("name", sorted(PAPER_STATS))
def test_real_data_matches_paper_stats(name):
    path = AMAZON / name / "interactions.csv"
    if not path.is_file():
        pytest.skip(f"shared data not found: {path}")
    inter = load_interactions(path)
    assert inter.stats() == PAPER_STATS[name]
    assert inter.user.dtype == np.int32 and inter.item.dtype == np.int32
    assert inter.timestamp.dtype == np.int64
    # The files are already 5-core: re-applying the filter changes nothing.
    raw = read_interactions(path)
    _assert_raw_equal(k_core_filter(raw, k=5), raw)
    split = leave_one_out(inter, max_history=20)
    n, u = inter.num_interactions, inter.num_users
    assert (len(split.train), len(split.valid), len(split.test)) == (n - 3 * u, u, u)
    assert split.test.history.shape == (u, 20) and split.num_items == inter.num_items


# ------------------------------------------------------------------ hand-computed cases


def test_k_core_chain():
    raw = _raw(CHAIN)
    _assert_raw_equal(k_core_filter(raw, k=2), raw.take(np.array(CHAIN_KEPT)))
    # k=1 keeps everything; the k=2 core is stable under k=2.
    _assert_raw_equal(k_core_filter(raw, k=1), raw)
    core = k_core_filter(raw, k=2)
    _assert_raw_equal(k_core_filter(core, k=2), core)


def test_k_core_nothing_left():
    with pytest.raises(DataError, match=r"mini\.csv: too few interactions after filtering"):
        k_core_filter(_raw(CHAIN, source="mini.csv"), k=3)


# File order; user b has two items at t=10: i3 (row 0) must stay before i1 (row 2).
LOO_ROWS = [
    ("b", "i3", 10), ("a", "i1", 5), ("b", "i1", 10), ("a", "i2", 3),
    ("b", "i2", 7), ("b", "i4", 20), ("a", "i4", 9), ("b", "i5", 30),
]  # fmt: skip


def test_index_interactions_sorts_stably():
    inter = index_interactions(_raw(LOO_ROWS))
    np.testing.assert_array_equal(inter.user_ids, ["a", "b"])
    np.testing.assert_array_equal(inter.item_ids, ["i1", "i2", "i3", "i4", "i5"])
    np.testing.assert_array_equal(inter.user, [0, 0, 0, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(inter.item, [1, 0, 3, 1, 2, 0, 3, 4])
    np.testing.assert_array_equal(inter.timestamp, [3, 5, 9, 7, 10, 10, 20, 30])
    assert inter.stats() == dict(users=2, items=5, interactions=8)


def test_leave_one_out_exact():
    # a: i2 i1 i4 -> items [1, 0, 3]; b: i2 i3 i1 i4 i5 -> items [1, 2, 0, 3, 4].
    inter = index_interactions(_raw(LOO_ROWS))
    split = leave_one_out(inter, max_history=2)
    assert split.num_items == 5
    np.testing.assert_array_equal(split.train.history, [[-1, 1], [1, 2]])
    np.testing.assert_array_equal(split.train.target, [2, 0])
    np.testing.assert_array_equal(split.train.user, [1, 1])
    np.testing.assert_array_equal(split.train.lengths, [1, 2])
    np.testing.assert_array_equal(split.valid.history, [[-1, 1], [2, 0]])
    np.testing.assert_array_equal(split.valid.target, [0, 3])
    np.testing.assert_array_equal(split.valid.user, [0, 1])
    np.testing.assert_array_equal(split.test.history, [[1, 0], [0, 3]])
    np.testing.assert_array_equal(split.test.target, [3, 4])
    np.testing.assert_array_equal(split.test.user, [0, 1])

    split = leave_one_out(inter, max_history=4)
    np.testing.assert_array_equal(split.train.history, [[-1, -1, -1, 1], [-1, -1, 1, 2]])
    np.testing.assert_array_equal(split.valid.history, [[-1, -1, -1, 1], [-1, 1, 2, 0]])
    np.testing.assert_array_equal(split.test.history, [[-1, -1, 1, 0], [1, 2, 0, 3]])
    np.testing.assert_array_equal(split.test.lengths, [2, 4])
    assert len(split.train) == 2 and len(split.test) == 2
    for s in (split.train, split.valid, split.test):
        assert s.history.dtype == s.target.dtype == s.user.dtype == np.int32


def test_leave_one_out_needs_three_interactions():
    inter = index_interactions(_raw(LOO_ROWS + [("c", "i1", 1), ("c", "i2", 2)], "x.csv"))
    with pytest.raises(DataError, match=r"x\.csv: 1 user\(s\) with fewer than 3.*'c' with 2"):
        leave_one_out(inter, max_history=2)


# ----------------------------------------------------------------------------- formats


def test_formats_give_identical_interactions(tmp_path):
    paths = _write_formats(tmp_path, CHAIN)
    expected = index_interactions(k_core_filter(_raw(CHAIN), k=2))
    for fmt, path in paths.items():
        _assert_raw_equal(read_interactions(path), _raw(CHAIN))
        _assert_inter_equal(load_interactions(path, min_count=2), expected)
        if fmt != "gz":
            _assert_inter_equal(load_interactions(path, fmt=fmt, min_count=2), expected)
    _assert_inter_equal(load_interactions(paths["gz"], "mcauley_json", min_count=2), expected)


def test_amazon2023_reviews_are_read_in_millisecond_order_and_floored_to_seconds(tmp_path):
    def record(user, item, ms):
        return json.dumps({"rating": 5.0, "title": "t", "asin": item + "-variant",
                           "parent_asin": item, "user_id": user, "timestamp": ms,
                           "verified_purchase": True}) + "\n"

    # u1's "b" and "a" fall in the same second; "a" is 300 ms earlier but later in the file.
    text = (record("u1", "b", 5_000_700) + record("u2", "a", 1_000_000)
            + record("u1", "a", 5_000_400) + record("u2", "b", 9_999_999))
    path = _write(tmp_path / "Toys_and_Games.jsonl", text)
    raw = read_interactions(path)
    _assert_raw_equal(raw, _raw([("u2", "a", 1000), ("u1", "a", 5000), ("u1", "b", 5000),
                                 ("u2", "b", 9999)], source=str(path)))
    inter = load_interactions(path, min_count=1)
    item_ids = list(inter.item_ids)
    assert [item_ids[i] for i in inter.item[inter.user == 0]] == ["a", "b"]  # u1: a then b
    gz = tmp_path / "reviews.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(text)
    _assert_raw_equal(read_interactions(gz, "amazon2023_jsonl"), _raw(
        [("u2", "a", 1000), ("u1", "a", 5000), ("u1", "b", 5000), ("u2", "b", 9999)],
        source=str(gz)))
    _raises(_write(tmp_path / "no_parent.jsonl", '{"user_id": "u", "timestamp": 1}\n'),
            "line 1: missing JSON key.*parent_asin", fmt="amazon2023_jsonl")


# ------------------------------------------------------------------------------ errors


def _raises(path: Path, message: str, fmt: str = "auto", min_count: int = 1):
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*" + message):
        load_interactions(path, fmt=fmt, min_count=min_count)


HEADER = "user,item,timestamp\n"


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("empty.csv", "", "empty file"),
        ("header_only.csv", HEADER, "empty file"),
        ("no_ts.csv", "user,item,time\nu,i,1\n", "missing column.*timestamp"),
        ("bad_ts.csv", HEADER + "u,i,1\nu,i,abc\n", "line 3: bad timestamp 'abc'"),
        ("float_ts.csv", HEADER + "u,i,1.5\n", "line 2: bad timestamp '1.5'"),
        ("neg_ts.csv", HEADER + "u,i,1\nu,i,-4\n", "line 3: negative timestamp"),
        ("fields.csv", HEADER + "u,i,1\nu,i\n", "line 3: wrong field count 2"),
        ("empty_id.csv", HEADER + "u,i,1\n,i,2\n", "line 3: empty user id"),
        ("ratings.csv", "u,i,5.0,1\nu,i,5.0,x\n", "line 2: bad timestamp 'x'"),
        ("bad.json", '{"reviewerID": "u", "asin": "i", "unixReviewTime": 1}\n{"reviewerID"\n',
         "line 2: JSON decode error"),
        ("key.json", '{"reviewerID": "u", "unixReviewTime": 1}\n',
         "line 1: missing JSON key.*asin"),
        ("ts.json", '{"reviewerID": "u", "asin": "i", "unixReviewTime": "7"}\n',
         "line 1: bad timestamp"),
        ("blank.json", "\n\n", "empty file"),
    ],
)  # fmt: skip
def test_malformed_input(tmp_path, name, text, message):
    _raises(_write(tmp_path / name, text), message)


def test_missing_file_and_bad_gzip(tmp_path):
    _raises(tmp_path / "nope.csv", "file not found")
    _raises(_write(tmp_path / "broken.json.gz", "not gzip"), "cannot read as mcauley_json")


def test_too_few_after_filtering(tmp_path):
    path = _write_formats(tmp_path, CHAIN)["csv"]
    _raises(path, r"too few interactions after filtering with k=5: 9 interactions", min_count=5)


# -------------------------------------------------------------------------------- TFDS


def test_tfds_round_trip(tmp_path):
    # Unsorted times, a repeated pair and a non-ASCII id: the file order must come back.
    rows = CHAIN + [("u1", "a", 0), ("ü5", "b", 7)]
    manual = tmp_path / "manual"
    manual.mkdir()
    path = _write_formats(manual, rows)["gz"]
    config = tfds_builder.AmazonInteractionsConfig(name="tiny", filename=path.name)
    tfds_builder.prepare_tfds(config, manual, tmp_path / "tfds")
    loaded = tfds_builder.load_tfds_interactions("tiny", tmp_path / "tfds")
    _assert_raw_equal(loaded, read_interactions(path))
    assert sorted(tfds_builder.AmazonInteractions.builder_configs) == ["beauty", "toys"]
    with pytest.raises(DataError, match="no prepared dataset"):
        tfds_builder.load_tfds_interactions("toys", tmp_path / "tfds")
    with pytest.raises(DataError, match=re.escape(str(manual / "toys")) + ".*file not found"):
        tfds_builder.prepare_tfds("toys", manual, tmp_path / "tfds")


def _shipped_config(name: str):
    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).resolve().parents[1] / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("cpu")


@pytest.mark.parametrize("config_name", ["tiger_toys", "dact_beauty"])
def test_shipped_configs_use_the_predefined_tfds_datasets(config_name):
    from genrec_jax.data import tfds_builder
    config = _shipped_config(config_name)
    builder_config, manual_dir = tfds_builder.config_for_file(config.data.name, config.data.path,
                                                              config.data.format)
    assert builder_config.name == config.data.name  # "toys" / "beauty", not a file digest
    assert (manual_dir / builder_config.filename).resolve() == Path(config.data.path).resolve()


@pytest.mark.parametrize("config_name", ["tiger_toys", "own_file_named_toys"])
def test_tfds_path_with_the_shipped_configs(tmp_path, config_name):
    """`--config.data.use_tfds=True` with a shipped config (the predefined TFDS name toys; the
    beauty one differs only in its file: the test above) and with a user's own file under a
    predefined name: the pipeline's data stage reads the same interactions through TFDS as
    directly."""
    from genrec_jax.stages import load_dataset
    if config_name == "own_file_named_toys":
        config = _shipped_config("tiger_toys")
        config.data.path = str(_write_formats(tmp_path, CHAIN * 3)["csv"])
        config.data.min_count = 1
    else:
        config = _shipped_config(config_name)
    if not Path(config.data.path).is_file():
        pytest.skip(f"{config.data.path} not found")
    config.data.use_tfds = True
    config.data.tfds_dir = str(tmp_path / "tfds")
    direct = load_interactions(config.data.path, config.data.format, config.data.min_count)
    through_tfds = load_dataset(config, str(tmp_path))
    for field in ("user", "item", "timestamp", "user_ids", "item_ids"):
        np.testing.assert_array_equal(getattr(through_tfds, field), getattr(direct, field))
    assert load_dataset(config, str(tmp_path)).num_interactions == direct.num_interactions


@pytest.mark.parametrize("grouping", ["length", "random"])
def test_batches_cover_every_sample_once_and_fit_their_bucket(grouping):
    from genrec_jax.data.batching import bucketed_batches
    lengths = np.random.default_rng(0).integers(1, 21, 1000)
    buckets = (4, 8, 20)
    batches = bucketed_batches(lengths, 64, buckets, seed=3, epoch=1, grouping=grouping)
    seen = np.concatenate([idx[idx >= 0] for _, idx in batches])
    np.testing.assert_array_equal(np.sort(seen), np.arange(1000))
    homogeneous = []
    for slots, idx in batches:
        assert len(idx) == 64
        real = lengths[idx[idx >= 0]]
        smallest = min(b for b in buckets if b >= real.max())
        assert slots == smallest  # padded only to the bucket of the longest history
        homogeneous.append(len({min(b for b in buckets if b >= n) for n in real}) == 1)
    assert all(homogeneous) == (grouping == "length")
    again = bucketed_batches(lengths, 64, buckets, seed=3, epoch=1, grouping=grouping)
    assert all(a[0] == b[0] and np.array_equal(a[1], b[1]) for a, b in zip(batches, again))
    with pytest.raises(ValueError, match="grouping"):
        bucketed_batches(lengths, 64, buckets, seed=3, grouping="sorted")


@pytest.mark.parametrize("grouping", ["length", "random"])
def test_dispatches_stack_one_width_and_keep_the_shuffled_order(grouping):
    """sample_dispatches against the epoch's batches: every batch once, in one dispatch of its
    own width, runs in their shuffled order, filler steps masked; 1 step = sample_batches."""
    from genrec_jax.data.batching import bucketed_batches, sample_batches, sample_dispatches
    from genrec_jax.data.splits import SampleSet
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 21, 700)
    history = np.where(np.arange(20)[None] >= 20 - lengths[:, None],
                       rng.integers(0, 50, (700, 20)), -1).astype(np.int32)
    samples = SampleSet(history=history, target=rng.integers(0, 50, 700).astype(np.int32),
                        user=np.arange(700, dtype=np.int32))
    buckets = (4, 8, 20)
    batches = bucketed_batches(samples.lengths, 32, buckets, seed=5, epoch=2, grouping=grouping)
    position = {tuple(idx): i for i, (_, idx) in enumerate(batches)}
    single = {tuple(idx): b for b, idx in sample_batches(samples, 32, buckets, seed=5, epoch=2,
                                                         grouping=grouping)}
    dispatches = list(sample_dispatches(samples, 32, buckets, 3, seed=5, epoch=2,
                                        grouping=grouping))
    firsts, seen = [], []
    for batch, idx in dispatches:
        mask = batch["step_ids"] >= 0
        assert idx.shape == (3, 32) and mask.tolist() == sorted(mask.tolist(), reverse=True)
        assert (idx[~mask] == -1).all() and (batch["weight"][~mask] == 0).all()
        order = [position[tuple(row)] for row in idx[mask]]
        assert order == batch["step_ids"][mask].tolist()  # each batch's step number
        assert order == sorted(order)  # a dispatch keeps its bucket's shuffled order
        assert {batches[i][0] for i in order} == {batch["history"].shape[2]}  # one width
        firsts.append(order[0])
        seen += order
        for step in np.flatnonzero(mask):  # the rows gathered as sample_batches gathers them
            for k in ("history", "target", "weight"):
                np.testing.assert_array_equal(batch[k][step], single[tuple(idx[step])][k])
    assert sorted(seen) == list(range(len(batches)))  # every batch once
    assert firsts == sorted(firsts)  # runs in the order of their first batch
    one = [idx[0] for _, idx in sample_dispatches(samples, 32, buckets, 1, seed=5, epoch=2,
                                                  grouping=grouping)]
    assert all(np.array_equal(a, b) for a, (_, b) in zip(one, batches))
