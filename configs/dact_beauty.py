"""DACT and every TIGER-backbone baseline of its paper on Amazon 2014 Beauty (continual).

Pre-training on D0 (60 % of the interactions): SASRec CF embeddings (32-d), the collaborative
tokenizer (RQ-VAE on MiniLM item text + 0.02 InfoNCE with the CF embeddings, DACT's base
"0.6_cf" setting) and the T5 recommender; then periods D1..D4 (70/80/90/100 %) adapted by each
method of `continual.methods`.

Presets: default = the paper (TIGER 4+4 layers, d_ff 1024, lr 1e-4, batch 256, up to 200
epochs per period with early stopping; tokenizer fine-tuning 5,000 steps at lr 1e-4, batch 1024,
rho 0.3, tau 0.1, 32 slots, KL weight 5, stationary weight 0.1, alpha 0.02); "cpu" = small
model and budgets for a 2-core CPU (about 30 minutes for all methods).
"""

from genrec_jax.config import apply_preset, base_config, dataset_paths


def get_config(preset: str = ""):
  c = base_config()
  c.method = "continual"
  dataset_paths(c, "beauty")
  c.tokenizer.cf_weight = 0.02
  c.tokenizer.train_unit = "steps"  # the DACT paper: 20k steps (its code: 20k epochs)
  c.tokenizer.loss_reduction = "mean"  # the DACT code: F.mse_loss, RQ loss averaged over levels
  apply_preset(c, preset)
  if preset == "cpu":
    c.sasrec.epochs = 20  # period-0 CF model: 4 epochs left its embeddings near noise
    # 200 tokenizer fine-tuning steps at 10x the paper's rate stand in for its 5,000 at 1e-4:
    # at 1e-4, 200 naive steps re-assigned 35 % of the identifiers per period (session 1),
    # the paper's naive fine-tuning 71 % at level 1 and ~100 % overall (Table 4, Tools).
    c.continual.dact.learning_rate = 1e-3
  return c
