"""TFDS packaging of raw interaction files, prepared and read back without TensorFlow.

`AmazonInteractions` is a manual-download `GeneratorBasedBuilder`: the user puts the
interaction files in a manual dir and each BuilderConfig names one file (relative to that
dir) and its format (see `read_interactions`). The single split "train" holds every raw row
as {user: text, item: text, timestamp: int64, row: int64}, where `row` is the row's index in
the file so that file order can be restored. Files are written as array_record, which TFDS
writes and reads (through `tfds.data_source`) with NumPy only; no TensorFlow is needed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2

from genrec_jax.data.interactions import DataError, RawInteractions, read_interactions


@dataclasses.dataclass(eq=False)
class AmazonInteractionsConfig(tfds.core.BuilderConfig):
    """A dataset config: `filename` is relative to the manual dir; `fmt` as in read_interactions."""

    filename: str = ""
    fmt: str = "auto"


class AmazonInteractions(tfds.core.GeneratorBasedBuilder):
    """Raw Amazon 2014 5-core interactions (user, item, timestamp) in file order."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Raw rows with their file row index."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Put the interaction files in the manual dir under the config's `filename`, e.g. use
    shared/data/amazon2014 itself as manual dir ({toys,beauty}/interactions.csv with the
    columns user,item,timestamp). Other datasets: pass an AmazonInteractionsConfig naming the
    file and its format ("csv", "mcauley_json" such as reviews_Tools_and_Home_Improvement_5
    .json.gz, or "ratings_csv").
    """
    BUILDER_CONFIGS = [
        AmazonInteractionsConfig(
            name="toys",
            description="Amazon 2014 Toys and Games 5-core.",
            filename="toys/interactions.csv",
            fmt="csv",
        ),
        AmazonInteractionsConfig(
            name="beauty",
            description="Amazon 2014 Beauty 5-core.",
            filename="beauty/interactions.csv",
            fmt="csv",
        ),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="User-item interactions with unix-second timestamps, one row each.",
            features=tfds.features.FeaturesDict(
                {
                    "user": tfds.features.Text(),
                    "item": tfds.features.Text(),
                    "timestamp": np.int64,
                    "row": np.int64,
                }
            ),
            disable_shuffling=True,
            homepage="https://cseweb.ucsd.edu/~jmcauley/datasets/amazon/links.html",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        path = dl_manager.manual_dir / self.builder_config.filename
        return {"train": self._generate_examples(path)}

    def _generate_examples(self, path):
        raw = read_interactions(Path(path), self.builder_config.fmt)
        rows = zip(raw.users.tolist(), raw.items.tolist(), raw.timestamps.tolist())
        for row, (user, item, timestamp) in enumerate(rows):
            yield row, {"user": user, "item": item, "timestamp": timestamp, "row": row}


def _config(name: str | AmazonInteractionsConfig) -> AmazonInteractionsConfig:
    if isinstance(name, AmazonInteractionsConfig):
        return name
    configs = AmazonInteractions.builder_configs
    if name not in configs:
        raise ValueError(f"unknown config {name!r}; known: {sorted(configs)}")
    return configs[name]


def config_for_file(name: str, path: str | Path, fmt: str = "auto"
                    ) -> tuple[AmazonInteractionsConfig, Path]:
    """The builder config and manual dir that prepare the interaction file `path`.

    A predefined config (toys, beauty) is used when `name` is one and `path` is its file under
    some manual dir (the shared data layout); any other file, including a user's own file
    under a predefined name, gets a config of its own, named after `name` and a digest of the
    file's absolute path and format, so that datasets of different files never share a name.
    """
    path = Path(path).resolve()
    predefined = AmazonInteractions.builder_configs.get(name)
    if predefined is not None and path.as_posix().endswith("/" + predefined.filename):
        return predefined, Path(path.as_posix()[:-len(predefined.filename) - 1])
    digest = hashlib.sha1(f"{path}|{fmt}".encode()).hexdigest()[:10]
    safe = re.sub(r"[^a-z0-9_]", "_", name.lower()) or "interactions"
    config = AmazonInteractionsConfig(name=f"{safe}_{digest}", filename=path.name, fmt=fmt,
                                      description=f"Interactions of {path}.")
    return config, path.parent


def prepare_tfds(
    name: str | AmazonInteractionsConfig, manual_dir: str | Path, data_dir: str | Path
) -> None:
    """Writes config `name` (a predefined name or a config) as array_record under data_dir.

    Reads only `manual_dir / config.filename`; never downloads. A dataset already prepared
    in data_dir is kept as it is.
    """
    config = _config(name)
    path = Path(manual_dir) / config.filename
    if not path.is_file():
        raise DataError(f"{path}: file not found (manual dir {manual_dir}, config {config.name})")
    builder = AmazonInteractions(config=config, data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=str(manual_dir), try_download_gcs=False
        )
    )


def load_tfds_interactions(name: str, data_dir: str | Path) -> RawInteractions:
    """Reads config `name` prepared by `prepare_tfds` back, in file order, without TensorFlow.

    Records come from the random-access `tfds.data_source` over the array_record files as raw
    bytes and are parsed with TFDS's TensorFlow-free tf.Example proto: TFDS's generic
    per-record NumPy decoding costs ~100 us a record (~18 s on Toys), this ~10 us.
    `source` of the result is the dataset's directory.
    """
    builder_dir = Path(data_dir) / AmazonInteractions.name / name / str(AmazonInteractions.VERSION)
    if not (builder_dir / "dataset_info.json").is_file():
        raise DataError(f"{builder_dir}: no prepared dataset (run prepare_tfds first)")
    source = tfds.data_source(
        f"{AmazonInteractions.name}/{name}:{AmazonInteractions.VERSION}",
        split="train",
        data_dir=str(data_dir),
        try_gcs=False,
        deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES,
    )
    users, items, timestamps, row = [], [], [], []
    for record in source.__getitems__(range(len(source))):
        feature = tf_example_pb2.Example.FromString(record).features.feature
        users.append(feature["user"].bytes_list.value[0].decode("utf-8"))
        items.append(feature["item"].bytes_list.value[0].decode("utf-8"))
        timestamps.append(feature["timestamp"].int64_list.value[0])
        row.append(feature["row"].int64_list.value[0])
    row = np.asarray(row, dtype=np.int64)
    order = np.argsort(row)
    if not np.array_equal(row[order], np.arange(len(row))):
        raise DataError(f"{builder_dir}: row indices are not a permutation of 0..{len(row) - 1}")
    return RawInteractions(
        users=np.asarray(users, dtype=str)[order],
        items=np.asarray(items, dtype=str)[order],
        timestamps=np.asarray(timestamps, dtype=np.int64)[order],
        source=str(builder_dir),
    )
