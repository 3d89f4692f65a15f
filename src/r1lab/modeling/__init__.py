"""Models: the character tokenizer, tiny presets, Hugging Face checkpoint IO and per-token log-probs.

Everything here works on ordinary transformers objects, so a tiny preset and a downloaded
Qwen2.5-0.5B go through the same code. Imports nothing from r1lab except `r1lab.config`.
"""

from r1lab.modeling.io import ModelError, load_model, load_tokenizer, save_checkpoint
from r1lab.modeling.logprobs import (
    count_params,
    flops_per_token,
    matmul_params,
    position_ids_from_mask,
    selective_log_softmax,
    token_logprobs,
)
from r1lab.modeling.tiny import DEFAULT_PRESET, PRESETS, build_model, preset_config
from r1lab.modeling.tokenizer import build_char_tokenizer

__all__ = [
    "DEFAULT_PRESET",
    "PRESETS",
    "ModelError",
    "build_char_tokenizer",
    "count_params",
    "flops_per_token",
    "matmul_params",
    "position_ids_from_mask",
    "selective_log_softmax",
    "token_logprobs",
    "build_model",
    "load_model",
    "load_tokenizer",
    "preset_config",
    "save_checkpoint",
]
