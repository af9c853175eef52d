"""Shipped configs: presets bounded by work, per-method defaults, one-line config errors."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from genrec_jax.config import (CONTINUAL_METHODS, ConfigError, base_config, check_config,
                               method_config)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


def _load(path: Path, preset: str):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_are_valid_and_bounded_by_work(path, shared_dir):
  for preset in ("", "cpu", "smoke"):
    config = _load(path, preset)
    if config.grm.backbone == "lcrec" and preset == "":
      # The paper's LC-Rec preset reads a local checkpoint: named in a one-line error.
      with pytest.raises(ConfigError, match="--config.grm.checkpoint=DIR"):
        check_config(config)
      config.grm.checkpoint = str(Path(__file__).parent / "fixtures" / "qwen2_untied")
    check_config(config)
    # the same command and seed give the same numbers on a busy or an idle machine
    assert config.grm.max_train_minutes == 0 and config.continual.retrain_max_minutes == 0
  smoke, cpu = _load(path, "smoke"), _load(path, "cpu")  # the cpu models, a few steps each
  assert (smoke.grm.d_model, smoke.sasrec.hidden_dim) == (cpu.grm.d_model, cpu.sasrec.hidden_dim)
  assert (smoke.grm.epochs, smoke.sasrec.epochs, smoke.tokenizer.train_length) == (1, 1, 200)
  paper = _load(path, "")
  method = paper.method
  if method == "tiger":  # TIGER paper: 20k epochs, squared norms
    assert (paper.tokenizer.train_unit, paper.tokenizer.loss_reduction) == ("epochs", "sum")
  if method == "letter":  # LETTER code: mean losses, lowest-collision checkpoint
    assert (paper.tokenizer.loss_reduction, paper.tokenizer.selection) == ("mean",
                                                                            "min_collision")
  if method == "etegrec":  # the paper's weights and forms; its model sizes and protocol
    e, g = paper.etegrec, paper.grm
    assert (e.sia_weight, e.psa_weight, e.sia_logit_sign, e.sia_level_reduction) == (
        3e-4, 1e-4, "distance", "sum")
    assert (paper.sasrec.hidden_dim, paper.tokenizer.latent_dim, g.num_encoder_layers,
            g.d_ff, g.level_softmax, g.constrained) == (256, 128, 6, 512, True, False)
  if method == "continual":  # DACT paper: 20k steps; DACT code: mean losses
    assert (paper.tokenizer.train_unit, paper.tokenizer.loss_reduction) == ("steps", "mean")
  if paper.grm.backbone == "lcrec":  # DACT Table 3: Qwen2.5-1.5B, LoRA r 8 / alpha 32, 2e-5
    lc = paper.grm.lcrec
    assert (lc.hidden_size, lc.num_layers, lc.num_heads, lc.num_kv_heads, lc.vocab_size) == (
        1536, 28, 12, 2, 151936)
    assert (lc.lora_rank, lc.lora_alpha, paper.grm.learning_rate) == (8, 32.0, 2e-5)
    assert len(paper.continual.methods) == 8 and cpu.grm.checkpoint == "random"
  assert (paper.grm.warmup_steps, paper.grm.grad_clip, paper.grm.loss_reduction) == (0, 0.0,
                                                                                     "mean")


def test_method_config_names_unknown_methods_and_presets():
  with pytest.raises(ValueError, match="unknown method 'tigr'"):
    method_config("tigr", "toys")
  with pytest.raises(ValueError, match="unknown preset 'gpu'"):
    method_config("tiger", "toys", "gpu")


def test_every_method_name_has_a_module():
  from genrec_jax.config import METHOD_NAMES
  from genrec_jax.methods import REGISTRY, method_module
  assert tuple(REGISTRY) == METHOD_NAMES
  assert all(callable(method_module(name).run) for name in METHOD_NAMES)


def test_every_continual_method_has_rules():
  from genrec_jax.methods.dact import METHOD_RULES
  # PIT composes its own periods (genrec_jax.methods.pit.continual); the others are rules
  assert tuple(METHOD_RULES) + ("pit",) == CONTINUAL_METHODS


def test_config_mistakes_name_the_field(tmp_path, shared_dir):
  config = _load(CONFIGS[0].parent / "dact_toys.py", "cpu")
  config.sasrec.hidden_dim = 64
  with pytest.raises(ConfigError, match=r"sasrec.hidden_dim=64 must equal tokenizer.latent"):
    check_config(config)
  config = base_config()
  config.tokenizer.train_unit = "minutes"
  with pytest.raises(ConfigError, match=r"tokenizer.train_unit='minutes' is not one of"):
    check_config(config)
  config = base_config()
  config.grm.epochs = 0
  with pytest.raises(ConfigError, match=r"grm.epochs=0 must be a positive number"):
    check_config(config)
  config = base_config()
  config.cpu_devices = 3
  with pytest.raises(ConfigError, match=r"sasrec.batch_size=128 is not divisible by cpu_devices"):
    check_config(config)
  config = base_config()  # method tiger
  config.tokenizer.diversity_weight = 1e-4
  with pytest.raises(ConfigError, match=r"diversity_weight=0.0001 is LETTER's loss"):
    check_config(config)
  config = _load(CONFIGS[0].parent / "letter_toys.py", "cpu")
  config.tokenizer.diversity_groups = 256
  with pytest.raises(ConfigError, match=r"diversity_groups=256 must lie in"):
    check_config(config)
  config = _load(CONFIGS[0].parent / "etegrec_toys.py", "cpu")
  config.etegrec.cycle = 1
  with pytest.raises(ConfigError, match=r"etegrec.cycle=1 must be >= 2"):
    check_config(config)
  config.etegrec.update(cycle=2, psa_weight=-1.0)
  with pytest.raises(ConfigError, match=r"etegrec.sia_weight, psa_weight and finetune_epochs"):
    check_config(config)


def test_missing_item_text_is_one_line_naming_the_fix(tmp_path, shared_dir):
  result = subprocess.run(
      [sys.executable, "-m", "genrec_jax.main", "--config=configs/dact_toys.py:cpu",
       "--config.data.items_csv=", f"--workdir={tmp_path / 'run'}"],
      capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=300)
  assert result.returncode == 2
  lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "Traceback" not in result.stderr
  assert "data.items_csv" in lines[0] and "embeddings.source=cf" in lines[0]
  assert not (tmp_path / "run").exists()  # nothing half-written
