"""Checkpoints as plain Hugging Face directories: atomic saving, and loading that fails in one line.

`save_checkpoint(model, tokenizer, path)` writes `config.json`, `generation_config.json`,
`model.safetensors` and the tokenizer files into a temporary directory beside `path`, fsyncs them,
then renames it into place, so a crash mid-save never leaves a half-written checkpoint under `path`
(an existing checkpoint there is replaced; only the instant between two renames has no `path`).
The files are made readable by transformers 4.x too (and so by vLLM builds pinned to it): see
`_portable_tokenizer_config` and `_portable_model_config`.

`load_model(path, dtype, device)` loads ANY local causal-LM directory the same way (an r1lab tiny
model or a downloaded Qwen2.5-0.5B-Instruct), never touching the network. Every way a directory can
be unusable (missing, no config.json, not a causal LM, no or incomplete weights, no tokenizer, a
tokenizer with neither pad nor eos token) raises `ModelError` with one line naming the path. A
tokenizer with eos but no pad token gets pad = eos, as is usual for decoder-only models.

    model, tok = load_model("runs/x/checkpoints/latest", dtype="bfloat16", device="cuda")
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging as hf_logging

from r1lab.config import R1labError


class ModelError(R1labError):
    """A model directory or preset that cannot be used."""


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
# What a broken weight or tokenizer file raises inside transformers / safetensors.
_LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError)


# --------------------------------------------------------------------------- saving


def _unwrap(model):
    """The plain PreTrainedModel inside torch.compile / DistributedDataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _portable_tokenizer_config(directory: Path) -> None:
    """Rewrite transformers-5-only fields of tokenizer_config.json into forms 4.x reads as well.

    5.x writes the class name `TokenizersBackend` (4.x has no such class; `PreTrainedTokenizerFast` is
    the same thing in both), a *list* under `extra_special_tokens` (4.x expects a dict there and
    crashes; the list means what `additional_special_tokens` means in both), and the chat template in
    `chat_template.jinja` only (older readers look in tokenizer_config.json).
    """
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return
    cfg = _read_json(path)
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = cfg.get("extra_special_tokens")
    if isinstance(extra, list):
        del cfg["extra_special_tokens"]
        if extra:
            cfg["additional_special_tokens"] = extra
    template = directory / "chat_template.jinja"
    if "chat_template" not in cfg and template.is_file():
        cfg["chat_template"] = template.read_text(encoding="utf-8")
    _write_json(path, cfg)


def _portable_model_config(directory: Path) -> None:
    """Mirror 5.x config fields (`rope_parameters.rope_theta`, `dtype`) under the 4.x names too."""
    path = directory / "config.json"
    cfg = _read_json(path)
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in cfg:
        cfg["rope_theta"] = rope["rope_theta"]
    if "dtype" in cfg and "torch_dtype" not in cfg:
        cfg["torch_dtype"] = cfg["dtype"]
    _write_json(path, cfg)


def _fsync_tree(directory: Path) -> None:
    for f in directory.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(model, tokenizer, path: str | os.PathLike) -> Path:
    """Write `model` and `tokenizer` as a Hugging Face directory at `path`, atomically; returns `path`.

    The model must be whole on this process (unwrap FSDP shards with a full state dict first);
    torch.compile and DDP wrappers are unwrapped here.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ModelError(f"{path}: exists and is not a directory; cannot save a checkpoint there")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; a checkpoint is read by servers and teammates
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        _unwrap(model).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _portable_tokenizer_config(tmp)
        _portable_model_config(tmp)
        _fsync_tree(tmp)
        if path.exists():
            os.rename(path, old)
        os.rename(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if old.exists() and not path.exists():
            os.rename(old, path)  # put the previous checkpoint back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return path


# --------------------------------------------------------------------------- loading


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _check_directory(path: Path) -> None:
    if not path.exists():
        raise ModelError(f"{path}: no such model directory")
    if not path.is_dir():
        raise ModelError(f"{path}: not a directory (expected a Hugging Face model directory)")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: no config.json (not a Hugging Face model directory)")
    if not any(any(path.glob(g)) for g in _WEIGHT_GLOBS):
        raise ModelError(f"{path}: no weights (expected model.safetensors or pytorch_model.bin)")
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelError(f"{path}: no tokenizer files (expected tokenizer.json or tokenizer_config.json)")


def _load_config(path: Path):
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except _LOAD_ERRORS as e:
        raise ModelError(f"{path}/config.json: cannot be read: {_first_line(e)}") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelError(
            f"{path}/config.json: model_type {config.model_type!r} is not a causal language model"
        )
    return config


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer of a local model directory, with pad = eos if it has no pad token."""
    path = Path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except _LOAD_ERRORS as e:
        raise ModelError(f"{path}: tokenizer cannot be loaded: {_first_line(e)}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"{path}: tokenizer has neither a pad token nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _resolve(
    dtype: str | torch.dtype, device: str | torch.device, path: Path
) -> tuple[torch.dtype, torch.device]:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ModelError(f"{path}: dtype {dtype!r} not supported; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ModelError(f"{path}: bad device {device!r}: {_first_line(e)}") from None
    return dtype, device


def load_model(
    path: str | os.PathLike, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"
):
    """(model in eval mode, tokenizer) from a local Hugging Face causal-LM directory; no network."""
    path = Path(path)
    torch_dtype, torch_device = _resolve(dtype, device, path)
    _check_directory(path)
    config = _load_config(path)
    tokenizer = load_tokenizer(path)
    try:
        hf_logging.disable_progress_bar()  # one-line errors and clean logs; loading a tiny model needs no bar
        model, info = AutoModelForCausalLM.from_pretrained(
            path,
            config=config,
            dtype=torch_dtype,
            local_files_only=True,
            trust_remote_code=False,
            output_loading_info=True,
        )
    except _LOAD_ERRORS as e:
        raise ModelError(f"{path}: weights cannot be loaded: {_first_line(e)}") from None
    # transformers initialises missing tensors randomly with only a warning; a model that is partly
    # noise must not be trained or evaluated as if it were the checkpoint.
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelError(f"{path}: weights incomplete: missing {missing[0]}{more}")
    gen = model.generation_config
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    if gen.eos_token_id is None:
        gen.eos_token_id = tokenizer.eos_token_id
    try:
        model = model.to(torch_device)
    except (RuntimeError, AssertionError) as e:  # e.g. "Torch not compiled with CUDA enabled"
        raise ModelError(f"{path}: cannot move the model to {torch_device}: {_first_line(e)}") from None
    return model.eval(), tokenizer
