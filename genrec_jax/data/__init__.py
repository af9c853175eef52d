"""Interaction data: reading, k-core filtering, indexing and leave-one-out splits.

The TFDS packaging lives in `genrec_jax.data.tfds_builder` (imported on demand, as it
imports tensorflow_datasets and registers a builder).
"""

from genrec_jax.data.interactions import (
    DataError,
    Interactions,
    RawInteractions,
    append_interactions,
    index_interactions,
    k_core_filter,
    load_interactions,
    read_interactions,
)
from genrec_jax.data.splits import PAD, SampleSet, StaticSplit, leave_one_out

__all__ = [
    "DataError",
    "Interactions",
    "PAD",
    "RawInteractions",
    "SampleSet",
    "append_interactions",
    "StaticSplit",
    "index_interactions",
    "k_core_filter",
    "leave_one_out",
    "load_interactions",
    "read_interactions",
]
