"""genrec_jax: generative recommendation with learnable item tokenizers in JAX/Flax NNX."""

from genrec_jax.tokenizers.quantizer import QuantizerOutput, ResidualQuantizer


def __getattr__(name):
  """`genrec_jax.Recommender` (serving), imported on first use: it pulls in the training
  stack, which `import genrec_jax` alone should not."""
  if name == "Recommender":
    from genrec_jax.serving import Recommender
    return Recommender
  raise AttributeError(f"module 'genrec_jax' has no attribute {name!r}")


__all__ = ["ResidualQuantizer", "QuantizerOutput", "Recommender"]
__version__ = "0.1.0"
