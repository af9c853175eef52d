"""LETTER (Wang et al., 2024; METHODS.md section 2): TIGER with a learnable tokenizer that also
aligns the quantized latents with SASRec's collaborative embeddings (InfoNCE, `tokenizer.cf_*`),
spreads codewords with a diversity loss over constrained k-means codeword groups
(`tokenizer.diversity_*`) and balances the last level's assignment with Sinkhorn-Knopp
(`tokenizer.sinkhorn_epsilon`); the tokenizer checkpoint with the fewest collisions is kept
(`tokenizer.selection`). The regularizers are terms of `tokenizers.rqvae.rqvae_losses`,
weighted by the config; the stages are TIGER's with the CF model always trained.
"""

from __future__ import annotations

import ml_collections

from genrec_jax.methods import tiger


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  return tiger.run(config, workdir, collaborative=True)
