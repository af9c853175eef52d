"""Reading, k-core filtering and indexing of user-item interaction logs.

Four on-disk formats are read into one `RawInteractions` (string ids, file order kept):

- "csv": a header naming at least the columns user, item, timestamp (any order, extra
  columns ignored), e.g. shared/data/amazon2014/*/interactions.csv;
- "mcauley_json": McAuley's 5-core review dumps, one JSON object per line (optionally
  gzipped) with the keys reviewerID, asin, unixReviewTime;
- "ratings_csv": McAuley's headerless ratings files, rows user,item,rating,timestamp.
- "amazon2023_jsonl": Amazon Reviews 2023 review files (ETEGRec's data), one JSON object per
  line (optionally gzipped) with the keys user_id, parent_asin (the item, as ETEGRec) and
  timestamp in milliseconds. The reader floors timestamps to seconds after a stable sort of the
  rows by their milliseconds, so events of one second keep their true order.

`k_core_filter` then applies the iterative k-core filter of PROTOCOLS.md section 1 and
`index_interactions` maps raw ids to dense indices and sorts each user's rows by time
(stable, so equal timestamps keep file order). Every bad input raises `DataError`, whose
message names the file and, where there is one, the line.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
from pathlib import Path

import numpy as np

FORMATS = ("csv", "mcauley_json", "ratings_csv", "amazon2023_jsonl")
_CSV_COLUMNS = ("user", "item", "timestamp")
# JSON-lines formats: (user key, item key, timestamp key), timestamp units per second.
_JSON_FORMATS = {"mcauley_json": (("reviewerID", "asin", "unixReviewTime"), 1),
                 "amazon2023_jsonl": (("user_id", "parent_asin", "timestamp"), 1000)}


class DataError(ValueError):
    """Malformed or unusable interaction data; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True, eq=False)
class RawInteractions:
    """Interaction rows as read, in file order.

    Attributes:
      users: str [N] raw user ids.
      items: str [N] raw item ids.
      timestamps: int64 [N] unix seconds.
      source: where the rows came from (a file path), used in error messages.
    """

    users: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.timestamps)

    def take(self, rows: np.ndarray) -> RawInteractions:
        """The rows selected by `rows` (bool mask [N] or int indices), order kept."""
        return RawInteractions(
            self.users[rows], self.items[rows], self.timestamps[rows], self.source
        )


@dataclasses.dataclass(frozen=True, eq=False)
class Interactions:
    """Indexed interactions, rows sorted by user index, then stably by timestamp.

    Attributes:
      user: int32 [N] user index in 0..U-1 (rank of the raw id among sorted raw user ids;
        users first seen in an appended period follow, see `append_interactions`).
      item: int32 [N] item index in 0..I-1 (rank of the raw id among sorted raw item ids;
        likewise).
      timestamp: int64 [N] unix seconds.
      user_ids: str [U] raw user id of each user index.
      item_ids: str [I] raw item id of each item index.
      source: where the rows came from, used in error messages.
    """

    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    user_ids: np.ndarray
    item_ids: np.ndarray
    source: str = ""

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_interactions(self) -> int:
        return len(self.user)

    def stats(self) -> dict[str, int]:
        return dict(
            users=self.num_users, items=self.num_items, interactions=self.num_interactions
        )


def _open_text(path: Path) -> io.TextIOBase:
    """Text handle on `path`, transparently gunzipping `*.gz`; newline='' for the csv module."""
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _is_int64(value: str) -> bool:
    try:
        return -(2**63) <= int(value) < 2**63
    except ValueError:
        return False


def _parse_timestamps(values: list[str], source: str, first_line: int) -> np.ndarray:
    """int64 [N] from decimal strings; `first_line` is the file line of values[0]."""
    try:
        ts = np.fromiter(map(int, values), dtype=np.int64, count=len(values))
    except (ValueError, OverflowError):
        i = next(i for i, v in enumerate(values) if not _is_int64(v))
        raise DataError(
            f"{source}: line {first_line + i}: bad timestamp {values[i]!r} "
            "(expected a non-negative integer of unix seconds)"
        ) from None
    negative = np.flatnonzero(ts < 0)
    if negative.size:
        i = int(negative[0])
        raise DataError(f"{source}: line {first_line + i}: negative timestamp {values[i]!r}")
    return ts


def _check_ids(name: str, ids: np.ndarray, source: str, first_line: int) -> None:
    empty = np.flatnonzero(ids == "")
    if empty.size:
        raise DataError(f"{source}: line {first_line + int(empty[0])}: empty {name} id")


def _read_csv(path: Path, header: bool) -> RawInteractions:
    source = str(path)
    with _open_text(path) as f:
        reader = csv.reader(f)
        if header:
            names = next(reader, None)
            if names is None:
                raise DataError(f"{source}: empty file")
            names = [n.strip() for n in names]
            missing = [c for c in _CSV_COLUMNS if c not in names]
            if missing:
                raise DataError(
                    f"{source}: missing column(s) {', '.join(missing)} in header {names} "
                    f"(need {', '.join(_CSV_COLUMNS)})"
                )
            width = len(names)
            cols = [names.index(c) for c in _CSV_COLUMNS]
        else:
            width, cols = 4, [0, 1, 3]
        rows = list(reader)
    first = 2 if header else 1
    if not rows:
        raise DataError(f"{source}: empty file (no interaction rows)")
    i = next((i for i, r in enumerate(rows) if len(r) != width), None)
    if i is not None:
        raise DataError(
            f"{source}: line {first + i}: wrong field count {len(rows[i])} (expected {width})"
        )
    fields = list(zip(*rows))
    users = np.asarray(fields[cols[0]], dtype=str)
    items = np.asarray(fields[cols[1]], dtype=str)
    _check_ids("user", users, source, first)
    _check_ids("item", items, source, first)
    return RawInteractions(
        users, items, _parse_timestamps(fields[cols[2]], source, first), source
    )


def _read_json_lines(path: Path, fmt: str) -> RawInteractions:
    """A JSON-lines format of `_JSON_FORMATS`: one object per line, blank lines skipped."""
    source = str(path)
    keys, per_second = _JSON_FORMATS[fmt]
    users, items, times = [], [], []
    with _open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{source}: line {line_no}: JSON decode error: {e}") from None
            if not isinstance(record, dict):
                raise DataError(f"{source}: line {line_no}: expected a JSON object")
            missing = [k for k in keys if k not in record]
            if missing:
                raise DataError(
                    f"{source}: line {line_no}: missing JSON key(s) {', '.join(missing)} "
                    f"(format {fmt} needs {', '.join(keys)})"
                )
            user, item, t = (record[k] for k in keys)
            if type(t) is not int or not 0 <= t < 2**63:
                raise DataError(
                    f"{source}: line {line_no}: bad timestamp {keys[2]}={t!r} "
                    "(expected a non-negative integer)"
                )
            for key, value in zip(keys[:2], (user, item)):
                if not isinstance(value, str) or not value:
                    raise DataError(f"{source}: line {line_no}: bad {key} {value!r}")
            users.append(user)
            items.append(item)
            times.append(t)
    if not times:
        raise DataError(f"{source}: empty file (no interaction records)")
    times = np.asarray(times, dtype=np.int64)
    order = np.argsort(times, kind="stable") if per_second > 1 else np.arange(len(times))
    return RawInteractions(
        np.asarray(users, dtype=str)[order],
        np.asarray(items, dtype=str)[order],
        times[order] // per_second,
        source,
    )


def _detect_format(path: Path) -> str:
    """JSON lines by extension or a leading '{' (amazon2023_jsonl when the first record has
    parent_asin, else mcauley_json); else ratings_csv if the first line has 4 fields ending in
    an integer, else csv (which then checks the header)."""
    json_name = path.name.lower().endswith((".json", ".json.gz", ".jsonl", ".jsonl.gz"))
    try:
        with _open_text(path) as f:
            first = f.readline()
            while first and not first.strip():
                first = f.readline()
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError):
        if json_name:  # the reader reports what is wrong with the file
            return "mcauley_json"
        raise
    if not first.strip():
        raise DataError(f"{path}: empty file")
    if json_name or first.lstrip().startswith("{"):
        return "amazon2023_jsonl" if '"parent_asin"' in first else "mcauley_json"
    fields = next(csv.reader([first]))
    if len(fields) == 4 and fields[3].strip().isdigit():
        return "ratings_csv"
    return "csv"


def read_interactions(path: str | Path, fmt: str = "auto") -> RawInteractions:
    """Reads an interaction file into `RawInteractions` (file order kept).

    Args:
      path: the file; a name ending in .gz is gunzipped.
      fmt: one of `FORMATS` or "auto" (see the module docstring).
    """
    path = Path(path)
    if fmt not in FORMATS + ("auto",):
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS + ('auto',)}")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    try:
        if fmt == "auto":
            fmt = _detect_format(path)
        if fmt in _JSON_FORMATS:
            return _read_json_lines(path, fmt)
        return _read_csv(path, header=fmt == "csv")
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, csv.Error) as e:
        raise DataError(f"{path}: cannot read as {fmt}: {e}") from None


def k_core_filter(raw: RawInteractions, k: int = 5) -> RawInteractions:
    """Drops users and items with fewer than `k` interactions, repeatedly until stable.

    Counts are of interaction rows (a repeated user-item pair counts each time). Returns
    the surviving rows in their original order; raises DataError if none survive.
    """
    _, user = np.unique(raw.users, return_inverse=True)
    _, item = np.unique(raw.items, return_inverse=True)
    keep = np.ones(len(raw), dtype=bool)
    while True:
        user_count = np.bincount(user[keep], minlength=user.max(initial=-1) + 1)
        item_count = np.bincount(item[keep], minlength=item.max(initial=-1) + 1)
        new_keep = keep & (user_count[user] >= k) & (item_count[item] >= k)
        if new_keep.sum() == keep.sum():
            break
        keep = new_keep
    if not keep.any():
        raise DataError(
            f"{raw.source}: too few interactions after filtering with k={k}: "
            f"{len(raw)} interactions of {len(np.unique(user))} users and "
            f"{len(np.unique(item))} items leave 0"
        )
    return raw.take(keep)


def index_interactions(raw: RawInteractions) -> Interactions:
    """Maps raw ids to dense sorted-id indices; sorts rows by user, then stably by time."""
    user_ids, user = np.unique(raw.users, return_inverse=True)
    item_ids, item = np.unique(raw.items, return_inverse=True)
    order = np.argsort(raw.timestamps, kind="stable")
    order = order[np.argsort(user[order], kind="stable")]
    return Interactions(
        user=user[order].astype(np.int32),
        item=item[order].astype(np.int32),
        timestamp=raw.timestamps[order].astype(np.int64),
        user_ids=user_ids,
        item_ids=item_ids,
        source=raw.source,
    )


def append_interactions(inter: Interactions, raw: RawInteractions) -> Interactions:
    """`inter` followed by newer rows `raw` (a new time period), with stable indices.

    Users and items already in `inter` keep their indices; new ones get the next indices, in
    sorted raw-id order, so every table indexed by item (CF embeddings, identifier tables,
    semantic vectors) stays valid and only grows. The new rows are not k-core filtered: the
    catalog of earlier periods was fixed by the filter, and a new period brings whatever
    arrived. Rows are re-sorted by user, then stably by time.

    Raises DataError (naming `raw.source` and the first offending row) if `raw` is empty or any
    of its rows falls on or before the last UTC day of `inter`: periods are whole days.
    """
    if len(raw) == 0:
        raise DataError(f"{raw.source}: no interactions in the new period's file")
    last_day = int(inter.timestamp.max()) // 86400
    early = np.flatnonzero(raw.timestamps // 86400 <= last_day)
    if early.size:
        row = int(early[0])
        raise DataError(
            f"{raw.source}: {early.size} interaction(s) fall on or before "
            f"{np.datetime64(last_day, 'D')}, the last day of the existing data (first: row "
            f"{row + 1}, user {raw.users[row]!r}, item {raw.items[row]!r}, timestamp "
            f"{int(raw.timestamps[row])}); a new period must start on a later day"
        )

    def extend(ids: np.ndarray, new: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        added = np.setdiff1d(np.unique(new), ids)
        all_ids = np.concatenate([ids, added])
        order = np.argsort(all_ids, kind="stable")
        found = order[np.searchsorted(all_ids[order], new)]
        return all_ids, found.astype(np.int32)

    user_ids, user = extend(inter.user_ids.astype(str), raw.users.astype(str))
    item_ids, item = extend(inter.item_ids.astype(str), raw.items.astype(str))
    users = np.concatenate([inter.user, user])
    times = np.concatenate([inter.timestamp, raw.timestamps.astype(np.int64)])
    order = np.argsort(times, kind="stable")
    order = order[np.argsort(users[order], kind="stable")]
    return Interactions(
        user=users[order].astype(np.int32),
        item=np.concatenate([inter.item, item])[order].astype(np.int32),
        timestamp=times[order],
        user_ids=user_ids,
        item_ids=item_ids,
        source=f"{inter.source} + {raw.source}",
    )


def load_interactions(path: str | Path, fmt: str = "auto", min_count: int = 5) -> Interactions:
    """`read_interactions`, then `k_core_filter(k=min_count)`, then `index_interactions`."""
    return index_interactions(k_core_filter(read_interactions(path, fmt), k=min_count))
