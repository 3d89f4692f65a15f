"""Tiny decoder presets: small GPT-2 and Qwen2 models that train in minutes on a laptop CPU.

Each preset is a plain Hugging Face config (`GPT2Config` or `Qwen2Config`), so a tiny model is an
ordinary `PreTrainedModel`: it saves as a Hugging Face directory and loads in transformers and vLLM
like any released checkpoint. All presets use 512 positions, tied input/output embeddings, no dropout
(RL compares log-probs of the same tokens computed twice; dropout would make them disagree) and
the vocabulary of the tokenizer they are built with (`r1lab.modeling.tokenizer`: 264 tokens).

Names give the total parameter count with the character tokenizer (tied embeddings counted once);
`tests/unit/test_modeling.py` checks each name against the real count:

    preset      arch   d_model x layers  heads (kv)  d_ff   params
    gpt2-1m     GPT-2  128 x 4           2           512    0.89M
    gpt2-2m     GPT-2  192 x 4           3           768    1.93M
    gpt2-3m     GPT-2  256 x 4           4           1024   3.36M   learns 4-digit addition on CPU
    gpt2-5m     GPT-2  256 x 6           4           1024   4.94M
    gpt2-30m    GPT-2  512 x 9           8           2048   28.8M
    qwen2-4m    Qwen2  256 x 4           4 (2)       1024   4.00M   (RoPE, RMSNorm, SwiGLU, GQA)
    qwen2-34m   Qwen2  512 x 8           8 (2)       2304   33.7M

Build one with `build_model("gpt2-3m", build_char_tokenizer(), seed=0)`; the same seed gives the same
weights. `preset_config` gives the config alone (e.g. to estimate cost without allocating weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, GPT2Config, PretrainedConfig, PreTrainedModel, Qwen2Config

from r1lab.modeling.io import ModelError

MAX_POSITIONS = 512


@dataclass(frozen=True)
class Preset:
    arch: Literal["gpt2", "qwen2"]
    d_model: int
    n_layer: int
    n_head: int  # head_dim = d_model / n_head = 64 throughout
    d_ff: int
    n_kv_head: int | None = None  # grouped-query attention (Qwen2 only); None: same as n_head
    max_positions: int = MAX_POSITIONS


PRESETS: dict[str, Preset] = {
    "gpt2-1m": Preset("gpt2", 128, 4, 2, 512),
    "gpt2-2m": Preset("gpt2", 192, 4, 3, 768),
    "gpt2-3m": Preset("gpt2", 256, 4, 4, 1024),
    "gpt2-5m": Preset("gpt2", 256, 6, 4, 1024),
    "gpt2-30m": Preset("gpt2", 512, 9, 8, 2048),
    "qwen2-4m": Preset("qwen2", 256, 4, 4, 1024, n_kv_head=2),
    "qwen2-34m": Preset("qwen2", 512, 8, 8, 2304, n_kv_head=2),
}

#: The smallest preset that learns the built-in 4-digit arithmetic task well in CPU minutes.
DEFAULT_PRESET = "gpt2-3m"


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ModelError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_config(name: str, tokenizer) -> PretrainedConfig:
    """The Hugging Face config of a preset, with vocabulary and special ids from `tokenizer`."""
    p = get_preset(name)
    ids = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        # No separate BOS token: <eos> separates documents, as in GPT-2.
        "bos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": True,
    }
    if p.arch == "gpt2":
        return GPT2Config(
            n_embd=p.d_model,
            n_layer=p.n_layer,
            n_head=p.n_head,
            n_inner=p.d_ff,
            n_positions=p.max_positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **ids,
        )
    return Qwen2Config(
        hidden_size=p.d_model,
        num_hidden_layers=p.n_layer,
        num_attention_heads=p.n_head,
        num_key_value_heads=p.n_kv_head or p.n_head,
        intermediate_size=p.d_ff,
        max_position_embeddings=p.max_positions,
        # 1e4 is plenty for 512 positions, and it is also what transformers 4.x assumes when a
        # config.json written by 5.x carries the value only inside `rope_parameters`.
        rope_theta=10000.0,
        attention_dropout=0.0,
        **ids,
    )


def build_model(preset: str, tokenizer, seed: int = 0) -> PreTrainedModel:
    """A freshly initialised float32 model of `preset`; deterministic in `seed`, global RNG untouched."""
    config = preset_config(preset, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = model.generation_config
    gen.pad_token_id, gen.eos_token_id, gen.bos_token_id = (
        config.pad_token_id,
        config.eos_token_id,
        config.bos_token_id,
    )
    return model.eval()
