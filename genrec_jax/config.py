"""The configuration schema shared by every config file in `configs/`.

`base_config()` lists every field with its meaning; config files start from it and change what
their method and dataset need. Presets are selected as `--config=configs/tiger_toys.py:cpu`.
"""

from __future__ import annotations

import os

import ml_collections

SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                           "shared", "data", "amazon2014")


def base_config() -> ml_collections.ConfigDict:
  """Every field of a run, with the TIGER/DACT paper settings as defaults."""
  c = ml_collections.ConfigDict()
  c.method = "tiger"  # "tiger" | "letter" | "sasrec" | "continual" (DACT + baselines) |
  #   "etegrec" | "unigrec" | "pit".
  c.seed = 0  # Seeds every random choice (init, batch order, dropout): same seed, same numbers.
  c.cpu_devices = 1  # XLA devices the host CPU is split into, one thread each, the batch split
  #   over them (`training.sharding.use_cpu_devices`, applied by `genrec_jax.main`): 1 = one
  #   device on every core; the cpu presets use 2, one per core of the machine they are sized
  #   for. No effect on GPU/TPU computations.
  c.compilation_cache_dir = os.path.expanduser("~/.cache/genrec_jax/xla")  # JAX persistent
  #   compilation cache: a rerun or resume skips recompiling every shape ("" = off).
  c.checkpoint_minutes = 1.0  # Least time between two checkpoints of an epoch loop (0 =
  #   after every epoch); its last epoch is always saved. An interrupted run resumes from its
  #   last checkpoint and replays the epochs after it, to the same numbers. Every save writes
  #   all parameter and optimizer arrays: per-epoch saves can cost more than short epochs.

  c.data = ml_collections.ConfigDict()
  c.data.name = "toys"  # Dataset name reported in results.json.
  c.data.path = os.path.join(SHARED_DATA, "toys", "interactions.csv")  # Raw interactions file.
  c.data.format = "auto"  # "auto" | "csv" | "mcauley_json" | "ratings_csv" | "amazon2023_jsonl".
  c.data.items_csv = os.path.join(SHARED_DATA, "toys", "items.csv")  # Item text (title, cats).
  c.data.min_count = 5  # k of the k-core filter on users and items.
  c.data.max_history = 20  # Most recent items kept in a history (20 in TIGER/LETTER/DACT).
  c.data.use_tfds = False  # Prepare an array_record TFDS dataset and read through it.
  c.data.tfds_dir = ""  # Where TFDS datasets are prepared ("" = WORKDIR/tfds); may be gs://.

  c.embeddings = ml_collections.ConfigDict()
  c.embeddings.source = "minilm"  # "minilm" (own Flax port, title + categories) | "file" | "cf".
  c.embeddings.file = ""  # .npy / .parquet item vectors, one row per item (sorted raw ids).
  c.embeddings.cache_dir = os.path.expanduser("~/.cache/genrec_jax")  # MiniLM vector cache.

  c.sasrec = ml_collections.ConfigDict()
  c.sasrec.hidden_dim = 32  # CF embedding size (32 for LETTER/DACT, 256 for ETEGRec).
  c.sasrec.num_layers = 2  # Self-attention blocks.
  c.sasrec.num_heads = 1  # Attention heads.
  c.sasrec.max_len = 50  # Longest input window.
  c.sasrec.dropout_rate = 0.2  # Dropout on embeddings and blocks.
  c.sasrec.loss = "ce"  # "ce" full-softmax (strong) | "bce" one sampled negative (original).
  c.sasrec.learning_rate = 1e-3  # AdamW learning rate.
  c.sasrec.batch_size = 128  # Users per batch.
  c.sasrec.epochs = 200  # Epoch budget.
  c.sasrec.steps_per_dispatch = 1  # Updates per compiled call (as grm.steps_per_dispatch).
  c.sasrec.eval_every = 2  # Epochs between validation evaluations.
  c.sasrec.patience = 5  # Evaluations without improvement before early stopping.

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.kind = "rqvae"  # "rqvae" (trained by gradient) | "rqkmeans" (residual mini-batch
  #   k-means on the item vectors, no training: GRID / OneRec at catalog scale; train_length
  #   steps of batch_size vectors per level; TIGER only).
  c.tokenizer.hidden_dims = (512, 256, 128, 64)  # Encoder MLP hidden sizes (decoder mirrors).
  c.tokenizer.latent_dim = 32  # Size of the quantized latent.
  c.tokenizer.num_levels = 3  # L residual levels.
  c.tokenizer.codebook_size = 256  # K codes per level.
  c.tokenizer.dedup_size = 256  # Symbols of the dedup digit (largest group of shared codes).
  c.tokenizer.beta = 0.25  # Commitment loss weight.
  c.tokenizer.loss_reduction = "sum"  # Scale of reconstruction and RQ losses: "sum" = squared
  #   norms over dimensions, levels summed (TIGER paper) | "mean" = averages over dimensions
  #   and levels (LETTER and DACT code).
  c.tokenizer.detach_residual = True  # No gradient through the residual passed to the next
  #   level (reference RQ-VAE); False: later levels' losses reach the encoder and codebooks.
  c.tokenizer.cf_weight = 0.0  # LETTER collaborative InfoNCE weight (alpha; 0 = TIGER).
  c.tokenizer.cf_temperature = 1.0  # InfoNCE temperature.
  c.tokenizer.cf_similarity = "cosine"  # "cosine" (DACT code) | "dot" (LETTER code).
  c.tokenizer.diversity_weight = 0.0  # LETTER code diversity weight (1e-4 in LETTER).
  c.tokenizer.diversity_groups = 10  # Codeword groups per level for the diversity loss.
  c.tokenizer.sinkhorn_epsilon = 0.0  # > 0: last-level codes by balanced Sinkhorn assignment
  #   over each training batch (LETTER: 0.003); identifiers are always encoded by argmin.
  c.tokenizer.train_length = 20000  # Training length, in train_unit.
  c.tokenizer.train_unit = "epochs"  # "epochs" (passes over the items, N // batch_size batches:
  #   TIGER paper, LETTER and DACT code, ~240k steps on Toys) | "steps" (DACT paper's text).
  c.tokenizer.selection = "last"  # Parameters kept: "last" | "min_collision" (lowest collision
  #   rate among evaluations every eval_every units: the LETTER code).
  c.tokenizer.eval_every = 2000  # Units between collision-rate evaluations ("min_collision").
  c.tokenizer.batch_size = 1024  # Items per batch.
  c.tokenizer.steps_per_dispatch = 1  # Updates per compiled call (K > 1: one `lax.scan` over
  #   K item batches, the same updates; for accelerators, where a call costs more than a step).
  c.tokenizer.learning_rate = 1e-3  # AdamW learning rate.
  c.tokenizer.weight_decay = 1e-4  # AdamW weight decay.
  c.tokenizer.kmeans_iterations = 50  # Lloyd iterations of the per-level k-means init.
  c.tokenizer.kmeans_refresh_steps = ()  # Training steps at which the k-means init is fitted
  #   again to the moved encoder (keeps level-1 codes alive; probes in experiments/).
  c.tokenizer.soft = False  # Soft quantizer (UniGRec): codes p_l E_l with p_l =
  #   softmax(-||v_l - e||^2 / T), residuals from the soft codes, no VQ / commitment loss.
  c.tokenizer.temperature_start = 1.0  # T at the first training unit (soft tokenizer) ...
  c.tokenizer.temperature_end = 1.0  # ... annealed linearly per unit towards this (UniGRec:
  #   0.01 -> 0.001 over the pretraining epochs); identifiers are encoded at the last unit's T.
  c.tokenizer.uniformity_weight = 0.0  # UniGRec codeword uniformity (negative entropy of the
  #   batch's average code assignment per level; 1e-4).
  c.tokenizer.uniformity_reduction = "sum"  # Over levels: "sum" (paper) | "mean" (UniGRec code).
  c.tokenizer.warmup_units = 0  # Units of linear learning-rate warm-up (UniGRec code: 50 epochs).
  c.tokenizer.linear_decay = False  # After warm-up: constant, or linear decay to 0 (UniGRec).
  c.tokenizer.grad_clip = 0.0  # Global gradient-norm clipping (0 = none; UniGRec code: 1.0).

  c.grm = ml_collections.ConfigDict()
  c.grm.backbone = "t5"  # "t5" (TIGER's encoder-decoder) | "lcrec" (a Qwen2 LLM with LoRA over
  #   identifier prompts, DACT Table 3; continual method only, grm.lcrec.* and grm.checkpoint).
  c.grm.checkpoint = ""  # lcrec: a local Hugging Face Qwen2 checkpoint directory (config.json,
  #   safetensors, tokenizer.json), or "random" for a randomly initialised backbone of the
  #   grm.lcrec sizes. Nothing is downloaded.
  c.grm.lcrec = ml_collections.ConfigDict()  # LC-Rec backbone (grm.backbone="lcrec").
  c.grm.lcrec.vocab_size = 151936  # Sizes of a random backbone (a checkpoint brings its own):
  c.grm.lcrec.hidden_size = 1536  # the defaults are Qwen2.5-1.5B-Instruct's.
  c.grm.lcrec.intermediate_size = 8960
  c.grm.lcrec.num_layers = 28
  c.grm.lcrec.num_heads = 12
  c.grm.lcrec.num_kv_heads = 2
  c.grm.lcrec.rope_theta = 1e6
  c.grm.lcrec.tie_word_embeddings = True
  c.grm.lcrec.prompt = "lcrec"  # "lcrec": LC-Rec's instruction prompt | "identifiers": the
  #   history's identifiers between two markers (random backbones: a third of the tokens).
  c.grm.lcrec.lora_rank = 8  # LoRA r (LC-Rec / DACT).
  c.grm.lcrec.lora_alpha = 32.0  # LoRA alpha (scaling alpha / r).
  c.grm.lcrec.lora_dropout = 0.05  # Dropout of the adapters' inputs (LC-Rec).
  c.grm.lcrec.dtype = "float32"  # Activations and matmul inputs: "float32" | "bfloat16".
  c.grm.lcrec.param_dtype = "float32"  # Stored base weights: "float32" | "bfloat16" (adapters,
  #   identifier rows and optimizer state stay float32).
  c.grm.lcrec.param_sharding = "replicated"  # "fsdp": base weights and optimizer state split
  #   over the devices (models that do not fit one device).
  c.grm.lcrec.train_vocabulary = False  # Also train the base embedding and output layer
  #   (LC-Rec's code, PEFT modules_to_save); False: the added identifier rows only.
  c.grm.lcrec.train_backbone_from_init = False  # Period 0 trains the whole backbone (a stand-in
  #   for pre-training when grm.checkpoint="random"); later fits train adapters and rows.
  c.grm.d_model = 128  # T5 model width.
  c.grm.d_ff = 1024  # Feed-forward width.
  c.grm.num_heads = 6  # Attention heads.
  c.grm.d_kv = 64  # Size of each head.
  c.grm.num_encoder_layers = 4  # Encoder blocks.
  c.grm.num_decoder_layers = 4  # Decoder blocks.
  c.grm.dropout_rate = 0.1  # Dropout everywhere.
  c.grm.learning_rate = 1e-4  # AdamW learning rate (DACT code), constant.
  c.grm.weight_decay = 0.01  # AdamW weight decay.
  c.grm.warmup_steps = 0  # Linear warm-up steps (0 = none, the reference code).
  c.grm.grad_clip = 0.0  # Global gradient-norm clipping (0 = none, the reference code).
  c.grm.loss_reduction = "mean"  # Target-token cross-entropy "mean" (reference) | "sum".
  c.grm.batch_size = 256  # Training samples per batch (a multiple of the device count).
  c.grm.eval_batch_size = 256  # Users per beam-search batch.
  c.grm.beam_size = 20  # Beams = ranked items returned per user.
  c.grm.constrained = True  # Trie-constrained decoding (False: ETEGRec/UniGRec protocol).
  c.grm.level_softmax = False  # One softmax per identifier position over its own tokens, in
  #   training and decoding (ETEGRec's per-position tables); False: one over the vocabulary.
  c.grm.length_buckets = (2, 3, 4, 5, 6, 8, 10, 13, 16, 20)  # History-length buckets (items):
  #   a batch is padded to its bucket, so compute follows the real history lengths; each
  #   bucket is one more compiled shape (cached on disk, see compilation_cache_dir).
  c.grm.batch_grouping = "length"  # Training batches "length" (one history-length bucket each)
  #   | "random" (uniformly random, as the reference code, each padded to its longest bucket).
  c.grm.matmul_dtype = "float32"  # "bfloat16": bf16 matmul inputs, float32 accumulation and
  #   parameters (mixed precision for GPU/TPU matrix units; slower on CPU).
  c.grm.steps_per_dispatch = 1  # Updates per compiled call: K > 1 runs K batches of one
  #   length bucket in one `lax.scan` (accelerators, where a Python dispatch per step costs
  #   more than the step); 1 = one call per batch in the epoch's shuffled order.
  c.grm.epochs = 200  # Epoch budget.
  c.grm.eval_every = 1  # Epochs between validation evaluations (beam search).
  c.grm.patience = 15  # Evaluations without improvement before early stopping.
  c.grm.max_train_minutes = 0.0  # Optional wall-clock cap on training (0 = none). Presets
  #   bound work in epochs: a time cap makes results depend on the machine's load.
  c.grm.select_metric = "ndcg@10"  # Validation metric of model selection.
  c.grm.valid_users = 0  # Validation users for model selection and reported valid metrics
  #                        (a fixed random subset; 0 = all). Test metrics always use every user.

  c.continual = ml_collections.ConfigDict()  # Used by method "continual" (DACT and baselines).
  c.continual.methods = ("frozen", "ft_tok", "ft_grm", "ft_both", "ft_tok_rt_grm", "reformer",
                         "dact")  # Rows of the DACT table to run, in this order; "pit" adds
  #   PIT (genrec_jax.methods.pit.continual) beside them.
  c.continual.fractions = (0.6, 0.7, 0.8, 0.9)  # Cumulative cut points of D0..D4.
  c.continual.min_test_history = 2  # Fewest past items of a kept test target: 2 = official
  #   DACT split (users with >= 3 interactions up to the period's end); 1 = every user.
  c.continual.new_periods = ()  # Interaction files of later periods (data.format, no k-core
  #   filter), in time order, appended after D4 as D5, D6, ...; run again with the same workdir
  #   and only the new periods are computed (stored codebooks, identifiers and models carry over).
  c.continual.cf_finetune_epochs = 10  # SASRec fine-tuning epochs on each D_t.
  c.continual.finetune_epochs = 200  # GRM fine-tuning epoch budget per period (FT rules).
  c.continual.finetune_eval_every = 1  # Epochs between validations while adapting.
  c.continual.patience = 15  # Early-stopping patience while adapting (evaluations).
  c.continual.retrain_epochs = 200  # GRM epoch budget of "retrain from scratch" (RT).
  c.continual.retrain_max_minutes = 0.0  # Optional time cap of each RT retraining (0 = none).
  c.continual.dact = ml_collections.ConfigDict()  # Tokenizer fine-tuning (naive FT and DACT).
  c.continual.dact.rho = 0.3  # Fraction of each batch treated as drifting (top-rho of g).
  c.continual.dact.tau = 0.1  # CDIM attention temperature.
  c.continual.dact.num_slots = 32  # CDIM memory slots.
  c.continual.dact.value_dim = 64  # CDIM value-slot size.
  c.continual.dact.cdim_hidden = 32  # CDIM output MLP width.
  c.continual.dact.stationary_weight = 0.1  # lambda_s, weight of the stationary-path loss.
  c.continual.dact.anchor_weight = 1.0  # Weight of mse(z_old, o) in the stationary loss.
  c.continual.dact.kl_weight = 5.0  # lambda_g, level-1 stability KL weight.
  c.continual.dact.kl_temperature = 1.0  # T of the level-1 code distributions.
  c.continual.dact.kl_average_over_codes = True  # Divide the KL by K (official code).
  c.continual.dact.confidence_weight = 1e-3  # Weight of mean(g^2).
  c.continual.dact.cf_weight = 0.02  # alpha, collaborative InfoNCE weight when fine-tuning.
  c.continual.dact.steps = 5000  # Tokenizer fine-tuning steps per period.
  c.continual.dact.batch_size = 1024  # Items per fine-tuning batch.
  c.continual.dact.learning_rate = 1e-4  # AdamW learning rate.
  c.continual.dact.weight_decay = 1e-4  # AdamW weight decay.
  c.continual.dact.warmup_steps = 50  # Linear warm-up, then linear decay to 0.
  c.continual.dact.grad_clip = 1.0  # Global gradient-norm clipping.
  c.continual.dact.log_every = 500  # Steps between progress lines.
  c.continual.dact.steps_per_dispatch = 1  # Updates per compiled call (as
  #   tokenizer.steps_per_dispatch; the same updates).
  c.continual.lsat = ml_collections.ConfigDict()  # LSAT (lcrec backbone): two LoRA adapters.
  c.continual.lsat.combine = "merge"  # "merge": adapters (and identifier rows) merged entry-wise
  #   weight * long + (1 - weight) * short | "scores": the two models' log-probabilities mixed.
  c.continual.lsat.weight = 0.5  # Weight of the long-term adapter.
  c.continual.lsat.long_term_data = "all"  # The long-term adapter continues from period t-1's
  #   on D_0..D_t ("all": "trained on all periods so far", with continual.retrain_epochs) | on
  #   D_t alone ("period": then it is the ft_grm model).
  c.continual.peso = ml_collections.ConfigDict()  # PESO (lcrec backbone).
  c.continual.peso.weight = 2.0  # lambda of the proximal KL towards the previous adapters.

  c.etegrec = ml_collections.ConfigDict()  # Used by method "etegrec" (METHODS.md section 6).
  c.etegrec.cycle = 2  # C: one tokenizer epoch, then C - 1 recommender epochs (paper: 2 or 4).
  c.etegrec.alternate = True  # False: both sides every epoch (the ablation w/o AT).
  c.etegrec.end_to_end = True  # False: a fresh recommender retrained on the final identifiers
  #   (the ablation w/o ETE) instead of the second stage from the joint one.
  c.etegrec.sia_weight = 3e-4  # mu, sequence-item alignment (paper; official config 1e-4).
  c.etegrec.psa_weight = 1e-4  # lambda, preference-semantic alignment (paper; official 3e-4).
  c.etegrec.sia_logit_sign = "distance"  # SIA code distributions softmax(-d) "distance"
  #   (paper) | softmax(+d) "code" (official code).
  c.etegrec.sia_level_reduction = "sum"  # SIA over levels: "sum" (paper) | "mean" (code).
  c.etegrec.psa_temperature = 0.07  # InfoNCE temperature of PSA.
  c.etegrec.align_warmup_epochs = 10  # Epochs before the alignment losses switch on.
  c.etegrec.epochs = 400  # Joint-stage epoch budget.
  c.etegrec.eval_every = 2  # Epochs between validations of the joint stage.
  c.etegrec.patience = 15  # Evaluations without improvement before the joint stage stops.
  c.etegrec.recommender_lr = 5e-3  # AdamW, cosine after warm-up.
  c.etegrec.recommender_warmup_steps = 2000  # Recommender updates of linear warm-up (the
  #   official 8,000 scheduler steps, which its launcher advances once per GPU: 4 per update).
  c.etegrec.tokenizer_lr = 1e-4  # AdamW, cosine after warm-up.
  c.etegrec.tokenizer_warmup_steps = 1000  # Tokenizer updates of linear warm-up (official:
  #   8,000 // cycle scheduler steps, 4 per update).
  c.etegrec.weight_decay = 0.05  # Both optimizers (and the second stage).
  c.etegrec.grad_clip = 1.0  # Global gradient-norm clipping of every update.
  c.etegrec.finetune_epochs = 100  # Second stage (tokenizer frozen): epoch budget (0 = none).
  c.etegrec.finetune_lr = 5e-4  # Second stage: AdamW, cosine, no warm-up.
  c.etegrec.finetune_patience = 10  # Second stage: validation every epoch.

  c.unigrec = ml_collections.ConfigDict()  # Used by method "unigrec" (METHODS.md section 7).
  c.unigrec.recon_weight = 0.5  # Tokenizer reconstruction in the joint loss (official code).
  c.unigrec.token_weight = 0.01  # Token-level distillation: symmetric KL of code distributions.
  c.unigrec.representation_weight = 0.1  # Representation-level distillation: InfoNCE.
  c.unigrec.distill_temperature = 0.07  # InfoNCE temperature.
  c.unigrec.distill_logit_sign = "distance"  # Code distributions of the token-level KL:
  #   softmax(-d) "distance" (the tokenizer's own form) | softmax(+d) "code" (official code).
  c.unigrec.distill_level_reduction = "mean"  # KL over levels: "mean" (official) | "sum".
  c.unigrec.warmup_epochs = 10  # Joint epochs before the distillation losses switch on.
  c.unigrec.joint_temperature_end = 0.0  # 0: the joint stage keeps the pretraining's last
  #   temperature (official code); > 0: it anneals on, linearly from there to this value over
  #   the joint epochs.
  c.unigrec.epochs = 200  # Joint-stage epoch budget.
  c.unigrec.eval_every = 1  # Epochs between validations of the joint stage.
  c.unigrec.patience = 15  # Evaluations without improvement before the joint stage stops.
  c.unigrec.recommender_lr = 5e-3  # AdamW (T5 and the distillation adapters).
  c.unigrec.tokenizer_lr = 2e-7  # AdamW (the soft tokenizer; official code).
  c.unigrec.warmup_fraction = 0.1  # Linear warm-up over this fraction of the epoch budget's
  #   updates, then constant (official `constant_with_warmup`), both optimizers.
  c.unigrec.weight_decay = 0.05  # Both optimizers (and the second stage).
  c.unigrec.grad_clip = 1.0  # Gradient-norm clipping of each group's update.
  c.unigrec.finetune_epochs = 100  # Second stage (tokenizer frozen, no distillation): budget.
  c.unigrec.finetune_lr = 4e-4  # Second stage: AdamW, constant.
  c.unigrec.finetune_patience = 10  # Second stage: validation every epoch.

  c.pit = ml_collections.ConfigDict()  # Used by method "pit" (METHODS.md section 8; the sources
  #   give no settings: these are ours, genrec_jax/methods/pit.py). The recommender trains
  #   with the grm.* settings (TIGER's T5, epochs, validation, early stopping).
  c.pit.max_identifiers = 3  # m: the most identifiers an item keeps in the index (1 = the
  #   one-to-one ablation).
  c.pit.candidates = 8  # Code sequences the generator beam-generates per item at a refresh.
  c.pit.selection = "min_loss"  # Each example's identifier: "min_loss" (user-guided minimum
  #   loss) | "random" (uniform over the target's identifiers: the ablation).
  c.pit.index_every = 1  # Epochs between index refreshes (prune weak, add generated).
  c.pit.prune_share = 0.1  # An identifier stays while it takes at least this share of its
  #   item's selections between refreshes.
  c.pit.train_generator = True  # False: the generator stays at its warm start (ablation).
  c.pit.embedding_dim = 64  # Item embedding size (text projection + free vector).
  c.pit.embedding_lr = 1e-3  # AdamW of the item embeddings and the alignment's attention.
  c.pit.generator_lr = 1e-3  # AdamW of the generator in co-evolution.
  c.pit.weight_decay = 0.01  # Both AdamW above.
  c.pit.grad_clip = 1.0  # Gradient-norm clipping of the embeddings' and generator's updates.
  c.pit.warmstart_steps = 3000  # Generator warm-start updates on the source identifiers.
  c.pit.warmstart_batch_size = 1024  # Items per warm-start batch.
  c.pit.warmstart_lr = 2e-3  # AdamW of the warm start (constant, no weight decay).
  c.pit.generator = ml_collections.ConfigDict()  # The item-to-token transformer.
  c.pit.generator.d_model = 128  # Width.
  c.pit.generator.d_ff = 512  # Feed-forward width.
  c.pit.generator.num_heads = 4  # Attention heads (d_model / num_heads per head).
  c.pit.generator.num_layers = 2  # Causal self-attention blocks.
  return c


class ConfigError(ValueError):
  """A config field that makes no sense; the message names the field and the fix."""


METHOD_NAMES = ("tiger", "letter", "sasrec", "continual", "etegrec", "unigrec", "pit")  # methods.REGISTRY
CONTINUAL_METHODS = ("frozen", "ft_tok", "ft_grm", "ft_both", "ft_tok_rt_grm", "reformer", "dact",
                     "lsat", "peso", "pit")
LCREC_ONLY_METHODS = ("lsat", "peso")  # LoRA baselines of DACT Table 3
CHOICES = {
    "method": METHOD_NAMES,
    "data.format": ("auto", "csv", "mcauley_json", "ratings_csv", "amazon2023_jsonl"),
    "embeddings.source": ("minilm", "file", "cf"),
    "sasrec.loss": ("ce", "bce"),
    "tokenizer.loss_reduction": ("sum", "mean"),
    "tokenizer.train_unit": ("epochs", "steps"),
    "tokenizer.selection": ("last", "min_collision"),
    "tokenizer.cf_similarity": ("cosine", "dot"),
    "grm.loss_reduction": ("mean", "sum"),
    "grm.batch_grouping": ("length", "random"),
    "grm.matmul_dtype": ("float32", "bfloat16"),
    "etegrec.sia_logit_sign": ("distance", "code"),
    "etegrec.sia_level_reduction": ("sum", "mean"),
    "tokenizer.uniformity_reduction": ("sum", "mean"),
    "tokenizer.kind": ("rqvae", "rqkmeans"),
    "unigrec.distill_logit_sign": ("distance", "code"),
    "unigrec.distill_level_reduction": ("sum", "mean"),
    "pit.selection": ("min_loss", "random"),
    "grm.backbone": ("t5", "lcrec"),
    "grm.lcrec.prompt": ("lcrec", "identifiers"),
    "grm.lcrec.dtype": ("float32", "bfloat16"),
    "grm.lcrec.param_dtype": ("float32", "bfloat16"),
    "grm.lcrec.param_sharding": ("replicated", "fsdp"),
    "continual.lsat.combine": ("merge", "scores"),
    "continual.lsat.long_term_data": ("period", "all"),
}
POSITIVE = ("cpu_devices", "data.max_history", "sasrec.hidden_dim", "sasrec.epochs",
            "sasrec.batch_size", "sasrec.max_len", "sasrec.steps_per_dispatch",
            "tokenizer.latent_dim", "tokenizer.num_levels", "tokenizer.codebook_size",
            "tokenizer.dedup_size", "tokenizer.train_length", "tokenizer.batch_size",
            "tokenizer.steps_per_dispatch", "grm.d_model", "grm.epochs", "grm.eval_every",
            "grm.batch_size", "grm.eval_batch_size", "grm.beam_size", "grm.steps_per_dispatch",
            "continual.dact.steps", "continual.dact.batch_size",
            "continual.dact.steps_per_dispatch", "continual.min_test_history", "etegrec.cycle",
            "etegrec.epochs", "etegrec.eval_every", "unigrec.epochs", "unigrec.eval_every",
            "pit.max_identifiers", "pit.candidates", "pit.index_every", "pit.embedding_dim",
            "pit.warmstart_steps", "pit.warmstart_batch_size", "pit.generator.d_model",
            "pit.generator.num_heads", "pit.generator.num_layers", "grm.lcrec.lora_rank",
            "grm.lcrec.hidden_size", "grm.lcrec.num_layers", "grm.lcrec.num_heads",
            "grm.lcrec.num_kv_heads")


SHARDED_BATCHES = ("sasrec.batch_size", "tokenizer.batch_size", "grm.batch_size",
                   "grm.eval_batch_size", "continual.dact.batch_size")


def _field(config: ml_collections.ConfigDict, name: str):
  node = config
  for part in name.split("."):
    node = node[part]
  return node


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError (one line: the field, the problem, the fix) for settings that cannot
  work, before any data is read or model trained."""
  for name, choices in CHOICES.items():
    if _field(config, name) not in choices:
      raise ConfigError(f"{name}={_field(config, name)!r} is not one of {choices}")
  for name in POSITIVE:
    if not _field(config, name) >= 1:
      raise ConfigError(f"{name}={_field(config, name)!r} must be a positive number")
  for name in SHARDED_BATCHES:
    if _field(config, name) % config.cpu_devices:
      raise ConfigError(f"{name}={_field(config, name)} is not divisible by cpu_devices="
                        f"{config.cpu_devices}, the devices its batches are split over; choose "
                        f"a multiple of it (or --config.cpu_devices=1)")
  if not config.checkpoint_minutes >= 0:
    raise ConfigError(f"checkpoint_minutes={config.checkpoint_minutes!r} must be >= 0 (0 = a "
                      f"checkpoint after every epoch)")
  if not os.path.isfile(config.data.path):
    raise ConfigError(f"data.path={config.data.path!r}: file not found; point it at your "
                      f"interactions file")
  needs_text = config.embeddings.source == "minilm" and config.method != "sasrec"
  if needs_text and not os.path.isfile(config.data.items_csv):
    raise ConfigError(
        f"data.items_csv={config.data.items_csv!r}: no item text file, which "
        f"embeddings.source='minilm' embeds; give the items CSV, or set "
        f"--config.embeddings.source=cf (collaborative embeddings, for data without text) or "
        f"=file with --config.embeddings.file")
  if config.embeddings.source == "file" and not os.path.isfile(config.embeddings.file):
    raise ConfigError(f"embeddings.file={config.embeddings.file!r}: file not found, which "
                      f"embeddings.source='file' reads; give a .npy / .parquet of item vectors")
  uses_cf = config.tokenizer.cf_weight > 0 or config.method == "continual"
  if uses_cf and config.sasrec.hidden_dim != config.tokenizer.latent_dim:
    raise ConfigError(
        f"sasrec.hidden_dim={config.sasrec.hidden_dim} must equal tokenizer.latent_dim="
        f"{config.tokenizer.latent_dim}: the collaborative terms compare CF embeddings with "
        f"latents; set both to the same size")
  if config.tokenizer.diversity_weight > 0:
    if config.method != "letter":
      raise ConfigError(f"tokenizer.diversity_weight={config.tokenizer.diversity_weight} is "
                        f"LETTER's loss; use method=letter or set it to 0")
    if not 1 < config.tokenizer.diversity_groups < config.tokenizer.codebook_size:
      raise ConfigError(f"tokenizer.diversity_groups={config.tokenizer.diversity_groups} must "
                        f"lie in (1, tokenizer.codebook_size={config.tokenizer.codebook_size})")
  e = config.etegrec
  if config.method == "etegrec" and e.cycle < 2:
    raise ConfigError(f"etegrec.cycle={e.cycle} must be >= 2 (one tokenizer epoch, then "
                      f"cycle - 1 recommender epochs; the paper uses 2 or 4)")
  if config.method == "etegrec" and min(e.sia_weight, e.psa_weight, e.finetune_epochs) < 0:
    raise ConfigError(f"etegrec.sia_weight, psa_weight and finetune_epochs must be >= 0 "
                      f"(0 = the ablation without it / no second stage), got {e.sia_weight}, "
                      f"{e.psa_weight}, {e.finetune_epochs}")
  tok = config.tokenizer
  rq_kmeans_ok = (config.method == "tiger" and tok.train_unit == "steps"
                  and tok.cf_weight == 0)
  if tok.kind == "rqkmeans" and not rq_kmeans_ok:
    raise ConfigError(f"tokenizer.kind='rqkmeans' (no trained encoder, no loss) works with "
                      f"method=tiger, tokenizer.train_unit='steps' (mini-batch steps per "
                      f"level) and tokenizer.cf_weight=0, got method={config.method!r}, "
                      f"train_unit={tok.train_unit!r}, cf_weight={tok.cf_weight}")
  u = config.unigrec
  if config.method == "unigrec" and not tok.soft:
    raise ConfigError("method=unigrec needs tokenizer.soft=True (its soft identifiers); the "
                      "shipped configs set it")
  if tok.soft and tok.selection != "last":
    raise ConfigError(f"tokenizer.selection={tok.selection!r} with tokenizer.soft: the kept "
                      f"parameters would not match the final temperature the identifiers are "
                      f"encoded at; use 'last'")
  if config.method == "unigrec" and (u.warmup_epochs < 0 or u.finetune_patience < 1
                                     or min(u.recommender_lr, u.tokenizer_lr,
                                            u.finetune_lr) < 0):
    raise ConfigError(f"unigrec.warmup_epochs must be >= 0, finetune_patience >= 1 and the "
                      f"learning rates >= 0, got {u.warmup_epochs}, {u.finetune_patience}, "
                      f"{(u.recommender_lr, u.tokenizer_lr, u.finetune_lr)}")
  if config.method == "unigrec":
    weights = (u.recon_weight, u.token_weight, u.representation_weight, u.finetune_epochs,
               u.joint_temperature_end)
    if min(weights) < 0:
      raise ConfigError(f"unigrec.recon_weight, token_weight, representation_weight, "
                        f"finetune_epochs and joint_temperature_end must be >= 0 (0 = off), got "
                        f"{weights}")
    if not 0 <= u.warmup_fraction < 1:
      raise ConfigError(f"unigrec.warmup_fraction={u.warmup_fraction} must lie in [0, 1)")
  if min(tok.temperature_start, tok.temperature_end) <= 0:
    raise ConfigError(f"tokenizer.temperature_start / temperature_end must be > 0, got "
                      f"{tok.temperature_start}, {tok.temperature_end}")
  if not 0 <= tok.warmup_units < tok.train_length:
    raise ConfigError(f"tokenizer.warmup_units={tok.warmup_units} must lie in [0, "
                      f"tokenizer.train_length={tok.train_length})")
  p = config.pit
  uses_pit = config.method == "pit" or (config.method == "continual"
                                        and "pit" in config.continual.methods)
  if uses_pit and p.generator.d_model % p.generator.num_heads:
    raise ConfigError(f"pit.generator.d_model={p.generator.d_model} must be a multiple of "
                      f"pit.generator.num_heads={p.generator.num_heads}")
  if uses_pit and not 0 <= p.prune_share <= 1:
    raise ConfigError(f"pit.prune_share={p.prune_share} must lie in [0, 1]")
  if uses_pit and tok.kind != "rqvae":
    raise ConfigError(f"method=pit warm-starts its generator from the RQ-VAE's identifiers: "
                      f"set tokenizer.kind='rqvae' (got {tok.kind!r})")
  unknown = set(config.continual.methods) - set(CONTINUAL_METHODS)
  if config.method == "continual" and unknown:
    raise ConfigError(f"continual.methods has unknown {sorted(unknown)}; choose from "
                      f"{CONTINUAL_METHODS}")
  check_backbone(config, uses_pit)


def check_backbone(config: ml_collections.ConfigDict, uses_pit: bool) -> None:
  """The LC-Rec backbone's fields (`check_config`)."""
  g, lc = config.grm, config.grm.lcrec
  lcrec_methods = sorted(set(config.continual.methods) & set(LCREC_ONLY_METHODS))
  if g.backbone == "t5":
    if config.method == "continual" and lcrec_methods:
      raise ConfigError(f"continual.methods {lcrec_methods} are LoRA baselines of the LC-Rec "
                        f"backbone; set grm.backbone='lcrec' or drop them")
    return
  if config.method != "continual":
    raise ConfigError(f"grm.backbone='lcrec' is implemented for method=continual (DACT "
                      f"Table 3), not method={config.method!r}; use grm.backbone='t5'")
  if uses_pit:
    raise ConfigError("continual method 'pit' runs on the T5 backbone; drop it from "
                      "continual.methods or set grm.backbone='t5'")
  if g.checkpoint != "random" and not (g.checkpoint and os.path.isfile(
      os.path.join(g.checkpoint, "config.json"))):
    raise ConfigError(f"grm.checkpoint={g.checkpoint!r} is not a checkpoint directory (no "
                      f"config.json); give --config.grm.checkpoint=DIR, a local Qwen2 "
                      f"checkpoint (e.g. Qwen2.5-1.5B-Instruct), or 'random'")
  if lc.num_heads % lc.num_kv_heads or lc.hidden_size % lc.num_heads:
    raise ConfigError(f"grm.lcrec.num_heads={lc.num_heads} must divide hidden_size="
                      f"{lc.hidden_size} and be a multiple of num_kv_heads={lc.num_kv_heads}")
  if g.level_softmax:
    raise ConfigError("grm.level_softmax does not apply to the LC-Rec backbone (it scores "
                      "identifiers over its whole vocabulary); set it to False")
  if lc.train_vocabulary and lc.param_dtype != "float32":
    raise ConfigError("grm.lcrec.train_vocabulary trains the base embedding and output layer, "
                      "whose bf16 copies would round small updates away; use "
                      "grm.lcrec.param_dtype='float32' with it")
  if not 0 <= config.continual.lsat.weight <= 1 or config.continual.peso.weight < 0:
    raise ConfigError(f"continual.lsat.weight={config.continual.lsat.weight} must lie in "
                      f"[0, 1] and continual.peso.weight={config.continual.peso.weight} be "
                      f">= 0")


def dataset_paths(config: ml_collections.ConfigDict, name: str) -> None:
  """Points `config.data` at the shared Amazon 2014 dataset `name` (toys, beauty)."""
  config.data.name = name
  config.data.path = os.path.join(SHARED_DATA, name, "interactions.csv")
  config.data.items_csv = os.path.join(SHARED_DATA, name, "items.csv")


PRESETS = ("", "cpu", "smoke")


def apply_preset(config: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
  """Applies a named preset: "" keeps the paper settings; "cpu" fits a 2-core CPU; "smoke" is
  the cpu preset cut to a few steps per stage (`smoke_settings`, applied after the method's).

  The cpu preset shrinks the recommender (2+2 layers, d_model 64) and bounds every stage in
  steps or epochs (never wall-clock time, so that a busy machine gives the same numbers), so
  that one run finishes within about 15 minutes on 2 cores.
  """
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; use '' (paper settings), 'cpu' or 'smoke'")
  if preset == "":
    return config
  c = config
  c.cpu_devices = 2
  c.sasrec.epochs = 4
  c.tokenizer.train_length = 1000
  c.tokenizer.train_unit = "steps"
  c.tokenizer.eval_every = 100
  c.grm.d_model = 64
  c.grm.d_ff = 256
  c.grm.num_heads = 4
  c.grm.d_kv = 16
  c.grm.num_encoder_layers = 2
  c.grm.num_decoder_layers = 2
  c.grm.learning_rate = 2e-3
  c.grm.dropout_rate = 0.0  # Off for the short cpu runs.
  c.grm.epochs = 6  # 8 took 16-17 minutes on 2 cores (experiments/tiger_toys_cpu)
  c.grm.eval_every = 2
  c.grm.patience = 2
  c.grm.eval_batch_size = 512
  c.grm.valid_users = 3000
  c.continual.cf_finetune_epochs = 2
  c.continual.finetune_epochs = 4
  c.continual.finetune_eval_every = 2
  c.continual.patience = 1
  c.continual.retrain_epochs = 2
  c.continual.dact.steps = 200
  c.continual.dact.log_every = 100
  return c


def smoke_settings(c: ml_collections.ConfigDict) -> None:
  """The "smoke" preset: every stage of the method runs once, a few steps or one epoch each,
  on the cpu preset's models. It checks an installation end to end (the accelerator suite
  runs it first, `tools/accelerator/`); its numbers mean nothing."""
  c.sasrec.update(epochs=1, eval_every=1)
  # 200 tokenizer steps: after 20, the collaborative tokenizer of the continual configs put
  # 888 Toys items on one code sequence, more than the dedup digit can separate.
  c.tokenizer.update(train_length=200, train_unit="steps", eval_every=100, kmeans_iterations=5)
  c.grm.update(epochs=1, eval_every=1, valid_users=256)
  c.continual.update(cf_finetune_epochs=1, finetune_epochs=1, finetune_eval_every=1,
                     retrain_epochs=1)
  c.continual.dact.update(steps=10, log_every=5)
  c.etegrec.update(epochs=2, align_warmup_epochs=1, finetune_epochs=1, eval_every=1)
  c.unigrec.update(epochs=2, warmup_epochs=1, finetune_epochs=1, eval_every=1)
  c.pit.update(warmstart_steps=20)
  c.tokenizer.warmup_units = 0


def tiger_settings(c: ml_collections.ConfigDict, cpu: bool) -> None:
  """TIGER: RQ-VAE over MiniLM item text (title + categories), then T5; the paper settings
  are `base_config`'s (4+4 layers, d_model 128, d_ff 1024, lr 1e-4, batch 256, up to 200
  epochs, patience 15, beam 20); "cpu" is `apply_preset`'s (12-13 minutes on 2 cores)."""


def letter_settings(c: ml_collections.ConfigDict, cpu: bool) -> None:
  """LETTER-TIGER: RQ-VAE with collaborative and diversity regularization.

  SASRec (CE, 32-d) is trained first; its item embeddings are the collaborative signal of the
  InfoNCE term (alpha = 0.02 as in DACT's base tokenizer; LETTER searches 0.01-0.1) and it is
  reported as the discriminative baseline. Diversity weight 1e-4 (LETTER). 4 code levels as in
  LETTER's paper. Presets as TIGER's.
  """
  c.tokenizer.num_levels = 4
  c.tokenizer.selection = "min_collision"  # the LETTER code keeps the lowest-collision model
  c.tokenizer.loss_reduction = "mean"  # the LETTER code: F.mse_loss, RQ loss averaged over levels
  c.tokenizer.cf_weight = 0.02
  c.tokenizer.diversity_weight = 1e-4
  c.tokenizer.sinkhorn_epsilon = 0.003  # LETTER: balanced last-level codes while training
  if cpu:  # the 4-epoch CF model must carry signal (measured: experiments/letter_toys_cpu)
    c.sasrec.learning_rate = 5e-3


def sasrec_settings(c: ml_collections.ConfigDict, cpu: bool) -> None:
  """SASRec, the discriminative full-catalog baseline (full-softmax CE): 64-d, 2 blocks, max
  length 50, leave-one-out with the generative models' metrics. Presets: "" = up to 200 epochs
  (patience 5 evaluations); "cpu" = 30 epochs (about 11 minutes on 2 cores)."""
  c.sasrec.hidden_dim = 64
  c.sasrec.num_heads = 2
  if cpu:  # SASRec alone: spend the CPU budget on it
    c.sasrec.epochs = 30


def continual_settings(c: ml_collections.ConfigDict, cpu: bool) -> None:
  """DACT and every TIGER-backbone baseline of its paper (continual protocol).

  Pre-training on D0 (60 % of the interactions): SASRec CF embeddings (32-d), the collaborative
  tokenizer (RQ-VAE on MiniLM item text + 0.02 InfoNCE with the CF embeddings, DACT's base
  "0.6_cf" setting) and the T5 recommender; then periods D1..D4 (70/80/90/100 %) adapted by
  each method of `continual.methods`.

  Presets: "" = the paper (TIGER 4+4 layers, d_ff 1024, lr 1e-4, batch 256, up to 200 epochs
  per period with early stopping; tokenizer fine-tuning 5,000 steps at lr 1e-4, batch 1024,
  rho 0.3, tau 0.1, 32 slots, KL weight 5, stationary weight 0.1, alpha 0.02); "cpu" = the
  small model of `apply_preset` with budgets for a 2-core CPU (all methods on Toys in 37
  minutes on 2 cores; experiments/dact_toys_cpu/README.md, session 9).
  """
  c.tokenizer.cf_weight = 0.02
  c.tokenizer.train_unit = "steps"  # the DACT paper: 20k steps (its code: 20k epochs)
  c.tokenizer.loss_reduction = "mean"  # the DACT code: F.mse_loss, RQ loss averaged over levels
  if cpu:
    c.sasrec.learning_rate = 5e-3  # the period-0 CF model converges within the budget
    c.sasrec.epochs = 10  # session 6: validation N@10 0.031 at epoch 10 of 12
    c.continual.finetune_epochs = 3  # of 4: the 30-40 minute budget of issue 8
    c.continual.retrain_epochs = 1  # retraining from scratch every period (the costliest row)
    # 200 tokenizer fine-tuning steps at 10x the paper's rate stand in for its 5,000 at 1e-4.
    c.continual.dact.learning_rate = 1e-3
    c.pit.warmstart_steps = 500  # the `pit` row's generator warm start, as pit's cpu preset


def etegrec_settings(c: ml_collections.ConfigDict, cpu: bool) -> None:
  """ETEGRec: SASRec item embeddings (256-d) -> RQ-VAE (256-512-256-128, 3 x 256 codes of
  128, pretrained with k-means init: 10,000 epochs, AdamW 1e-3) -> joint stage with a T5 of
  6+6 layers, d_model 128, d_ff 512, 4 heads of 64, histories of up to 50 items, batch 2048
  (the official 512 x 4 GPUs), one softmax per identifier position, unconstrained beam search
  (the paper's protocol: an invalid identifier is a miss; results.json also reports the
  trie-constrained search). `etegrec` fields: the paper's weights and schedule.

  "cpu" (about 20 minutes on 2 cores): `apply_preset`'s small T5 and 1,000 tokenizer steps,
  a 64-d SASRec (lr 5e-3, 4 epochs), histories of 20, length-grouped batches of 256, a joint
  stage of 4 epochs (tokenizer, recommender, tokenizer, recommender; alignment from epoch 3)
  and 1 second-stage epoch.
  """
  c.embeddings.source = "cf"
  c.tokenizer.hidden_dims = (512, 256)
  c.tokenizer.latent_dim = 128
  c.tokenizer.loss_reduction = "mean"  # the official code: F.mse_loss, RQ averaged over levels
  c.grm.level_softmax = True
  c.grm.constrained = False
  if not cpu:
    c.grm.batch_grouping = "random"  # the official loader's shuffled batches (their unique
    #   targets are SIA / PSA / L_SQ rows and PSA's negatives); cpu keeps length groups (3x
    #   cheaper, experiments/tiger_toys_cpu fix 9)
    c.sasrec.hidden_dim = 256
    c.tokenizer.train_length = 10000
    c.grm.num_encoder_layers = 6
    c.grm.num_decoder_layers = 6
    c.grm.d_ff = 512
    c.grm.num_heads = 4
    c.grm.batch_size = 2048
    c.data.max_history = 50
    c.grm.length_buckets = (2, 3, 4, 5, 6, 8, 10, 13, 16, 20, 25, 30, 40, 50)
    return
  c.sasrec.hidden_dim = 64
  c.sasrec.learning_rate = 5e-3
  c.sasrec.epochs = 4  # valid N@10 0.038 (6 epochs: 0.042; experiments/etegrec_toys_cpu)
  c.etegrec.epochs = 4
  c.etegrec.align_warmup_epochs = 2
  c.etegrec.recommender_warmup_steps = 200
  c.etegrec.tokenizer_warmup_steps = 100
  c.etegrec.finetune_epochs = 1  # of 2 in the first run, the best was 1


def unigrec_settings(c: ml_collections.ConfigDict, cpu: bool) -> None:
  """UniGRec (the official Beauty script; METHODS.md section 7): item text vectors (MiniLM here,
  sentence-T5 in the official code) -> soft RQ-VAE (512-256-128-64 -> 32, 3 x 256 codes,
  pretrained 3,000 epochs, AdamW 1e-3 with 50 warm-up epochs and linear decay, clipping 1.0,
  T annealed 0.01 -> 0.001, uniformity 1e-4) -> joint stage with a T5 of 6+6 layers,
  d_model 128, d_ff 512, 4 heads of 64, dropout 0.1, batch 512, histories of 20, a 256-d
  SASRec teacher (`unigrec` fields: weights and schedule) -> second stage; beam 30,
  unconstrained (the paper's protocol), results.json also holds the trie-constrained search.

  "cpu" (within 20 minutes on 2 cores): `apply_preset`'s small T5, a 64-d SASRec teacher
  (lr 5e-3, 4 epochs), 90 tokenizer epochs (about 1,000 steps) annealed 0.01 -> 0.001 with 5
  warm-up epochs, a joint stage of 3 epochs (distillation from the second) and 1 second-stage
  epoch.
  """
  c.tokenizer.soft = True
  c.tokenizer.loss_reduction = "mean"  # F.mse_loss
  c.tokenizer.detach_residual = False  # the official code's hard residual chain (distillation)
  c.tokenizer.temperature_start = 0.01
  c.tokenizer.temperature_end = 0.001
  c.tokenizer.uniformity_weight = 1e-4
  c.tokenizer.train_unit = "epochs"
  c.tokenizer.train_length = 3000
  c.tokenizer.warmup_units = 50
  c.tokenizer.linear_decay = True
  c.tokenizer.grad_clip = 1.0
  c.grm.beam_size = 30
  c.grm.constrained = False
  if not cpu:
    c.sasrec.hidden_dim = 256
    c.grm.num_encoder_layers = 6
    c.grm.num_decoder_layers = 6
    c.grm.d_ff = 512
    c.grm.num_heads = 4
    c.grm.batch_size = 512
    return
  c.sasrec.hidden_dim = 64
  c.sasrec.learning_rate = 5e-3
  c.tokenizer.train_length = 90
  c.tokenizer.warmup_units = 5
  c.unigrec.epochs = 3
  c.unigrec.warmup_epochs = 1
  c.unigrec.eval_every = 1
  c.unigrec.finetune_epochs = 1


def pit_settings(c: ml_collections.ConfigDict, cpu: bool) -> None:
  """PIT (METHODS.md section 8; no public code, so no official settings): the source
  identifiers are TIGER's (RQ-VAE over MiniLM item text, 3 x 256 codes + dedup), the
  recommender is TIGER's T5 with its schedule (`base_config`'s grm fields), and the `pit`
  fields hold our settings for the embeddings, the generator and the index.

  "cpu" (within 20 minutes on 2 cores): `apply_preset`'s small T5 and 1,000 tokenizer steps,
  500 generator warm-start steps (95.5 % of the source identifiers reproduced on Toys), 6
  co-evolution epochs with validation every 2 (experiments/pit_toys_cpu).
  """
  if cpu:
    c.pit.warmstart_steps = 500


def lcrec_settings(c: ml_collections.ConfigDict, cpu: bool) -> None:
  """The continual protocol on the LC-Rec backbone (DACT Table 3; `continual_settings` for the
  tokenizer side): Qwen2.5-1.5B-Instruct from `--config.grm.checkpoint=DIR` with LoRA r 8,
  alpha 32, dropout 0.05 on q/k/v/o/gate/up/down, lr 2e-5 (the paper); LC-Rec's batch of 128
  (8 per device x 2 accumulation x 8 GPUs) and 4 epochs, bf16 weights and activations. Ours:
  validation on 2,000 users, evaluation batches of 32 users (x 20 beams).

  "cpu": a random backbone of the same architecture (2 layers, width 64, MLP 128, GQA 4/2
  heads, a 512-token base vocabulary, tied output), trained whole at period 0 (the stand-in
  for an LLM's pre-training; `grm.lcrec.train_backbone_from_init`), then LoRA and identifier
  rows only, at the cpu T5's learning rate; prompts of the identifiers alone
  (`grm.lcrec.prompt`): LC-Rec's instruction, meaningless to a random backbone, would triple
  the tokens (a period-0 epoch on Toys took 9.5 minutes with it, MLP 256, 2 busy cores).
  """
  c.grm.backbone = "lcrec"
  c.continual.methods = ("frozen", "ft_tok", "ft_grm", "ft_both", "reformer", "dact", "lsat",
                         "peso")
  if not cpu:
    c.grm.learning_rate = 2e-5
    c.grm.weight_decay = 0.01
    c.grm.batch_size = 128
    c.grm.epochs = 4
    c.grm.patience = 2
    c.grm.eval_batch_size = 32
    c.grm.valid_users = 2000
    c.continual.finetune_epochs = 4
    c.continual.patience = 2
    c.grm.lcrec.dtype = "bfloat16"
    c.grm.lcrec.param_dtype = "bfloat16"
    return
  c.grm.checkpoint = "random"
  c.grm.lcrec.update(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=2, rope_theta=10000.0,
                     train_backbone_from_init=True, prompt="identifiers",
                     lora_dropout=0.0)  # off, as the cpu T5's dropout (-9 % step time)
  c.continual.finetune_epochs = 2  # of the T5 cpu preset's 3: 8 methods in about 40 minutes
  # 2-epoch fits validate once, at their end (nothing to select), so validation is overhead
  # there: 1,000 users (the T5 preset: 3,000), in batches of 128 (the cpu presets: 512). Each
  # length bucket pads its last batch to the full size, so 1,000 users in batches of 512 cost
  # 10 batches of 1.19 s (9-11 s per validation, 320 s for the run's 31; session 13), and
  # batches of 128 take 0.26 s, as fast per user (tools/bench_lcrec.py --size=cpu).
  c.grm.valid_users = 1000
  c.grm.eval_batch_size = 128


METHOD_SETTINGS = {"tiger": tiger_settings, "letter": letter_settings,
                   "sasrec": sasrec_settings, "continual": continual_settings,
                   "etegrec": etegrec_settings, "unigrec": unigrec_settings,
                   "pit": pit_settings}


def method_config(method: str, dataset: str, preset: str = "", backbone: str = "t5"
                  ) -> ml_collections.ConfigDict:
  """The config of `method` on a shared Amazon 2014 dataset ("toys", "beauty") with a preset
  ("" = the paper's settings, "cpu" = a 2-core CPU, "smoke" = a few steps per stage):
  `base_config`, the dataset's paths, `apply_preset`, then the method's own settings
  (`METHOD_SETTINGS`, documented there), then the backbone's ("lcrec": `lcrec_settings`)."""
  if method not in METHOD_SETTINGS:
    raise ValueError(f"unknown method {method!r}; one of {sorted(METHOD_SETTINGS)}")
  c = base_config()
  c.method = method
  dataset_paths(c, dataset)
  apply_preset(c, preset)
  METHOD_SETTINGS[method](c, cpu=preset in ("cpu", "smoke"))
  if backbone == "lcrec":
    lcrec_settings(c, cpu=preset in ("cpu", "smoke"))
  if preset == "smoke":
    smoke_settings(c)
  return c
