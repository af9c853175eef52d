"""Item text and semantic embeddings (Flax NNX port of all-MiniLM-L6-v2, user-supplied vectors)."""

from genrec_jax.text.minilm import (MiniLM, encode_texts, item_texts, load_embedding_file,
                                    load_minilm, semantic_embeddings)

__all__ = ["MiniLM", "encode_texts", "item_texts", "load_embedding_file", "load_minilm",
           "semantic_embeddings"]
