"""DACT and every baseline of its Table 3 (continual, LC-Rec backbone) on Amazon 2014 Beauty.

A Qwen2 LLM with LoRA over identifier prompts: the paper's Qwen2.5-1.5B-Instruct read from
`--config.grm.checkpoint=DIR` (a local Hugging Face checkpoint directory; nothing is
downloaded). Settings and presets ("" = the paper's, "cpu" = a small random backbone on a
2-core CPU, "smoke" = a few steps per stage): `genrec_jax.config.lcrec_settings` and
`continual_settings`.
"""

from genrec_jax.config import method_config


def get_config(preset: str = ""):
  return method_config("continual", "beauty", preset, backbone="lcrec")
