"""genrec_jax: generative recommendation with learnable item tokenizers in JAX/Flax NNX."""

from genrec_jax.tokenizers.quantizer import QuantizerOutput, ResidualQuantizer

__all__ = ["ResidualQuantizer", "QuantizerOutput"]
__version__ = "0.1.0"
