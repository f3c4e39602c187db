"""Build, load and save Hugging Face causal LMs and their tokenizers (safetensors only)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from demix.checkpoint import MODEL_KIND, check_weight_files, read_hf_config
from demix.config import ArchitectureConfig
from demix.errors import ModelError
from demix.storage import staged_dir, write_manifest

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

# transformers is imported where a model or tokenizer is built or loaded, not at import time:
# it takes about 2 s, and merging, checking and hashing checkpoints never need it.

log = logging.getLogger(__name__)


def _quiet_transformers() -> None:
    """No per-file progress bars from transformers (loading and saving shards)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on CUDA, float32 on CPU (bf16 is ~20x slower on CPUs without it)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def build_tiny_llama(
    arch: ArchitectureConfig, vocab_size: int, eos_token_id: int, seed: int
) -> LlamaForCausalLM:
    """A small Llama initialised from config with a fixed seed (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _quiet_transformers()
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_heads,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=arch.tie_word_embeddings,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def load_model(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    attn_implementation: str | None = "eager",
):
    """Load any AutoModelForCausalLM folder from safetensors, never from pickle.

    Every weight file's header is checked by demix's own reader first (check_weight_files).
    Raises ModelError naming the folder or file when config.json or the safetensors weights are
    missing, unreadable or corrupt.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    folder = Path(path)
    check_weight_files(folder)
    read_hf_config(folder)
    if trust_remote_code:
        log.warning("trust_remote_code=True: code shipped with %s WILL BE EXECUTED", folder)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            use_safetensors=True,
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            dtype=dtype,
            **kwargs,
        )
    except (OSError, ValueError, SafetensorError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelError(f"{folder}: cannot load model ({reason})") from None
    return model.to(device)


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """Load a tokenizer from a local folder (no hub access).

    Raises ModelError when the folder has no loadable tokenizer.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            Path(path), local_files_only=True, trust_remote_code=trust_remote_code
        )
    except Exception as err:  # noqa: BLE001 (tokenizers raises bare Exception, transformers KeyError)
        reason = (str(err).strip().splitlines() or [""])[0]
        raise ModelError(
            f"{path}: cannot load tokenizer ({type(err).__name__}: {reason}); save it with "
            "`tokenizer.save_pretrained(dir)`"
        ) from None


def save_model(
    model,
    tokenizer,
    out: str | Path,
    extra_files: dict[str, str] | None = None,
    state_dict: dict | None = None,
    extra_tensors: dict[str, dict] | None = None,
    write_extra: Callable[[Path], None] | None = None,
    **manifest_fields,
) -> dict:
    """Save an HF folder (config, safetensors, tokenizer, extra text files) atomically, manifest last.

    `state_dict` replaces the model's own tensors (the gathered weights of a sharded model).
    `extra_tensors` {relative path: tensors} are further safetensors files (not weights: keep
    them in a subfolder, since every *.safetensors file at the top is read as weights).
    `write_extra(folder)` writes further files into the staged folder, before the manifest.
    """
    from safetensors.torch import save_file

    out = Path(out)
    _quiet_transformers()
    with staged_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        for name, tensors in (extra_tensors or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, tmp / name)
        if write_extra is not None:
            write_extra(tmp)
        manifest = write_manifest(tmp, MODEL_KIND, **manifest_fields)
    return manifest


def set_threads() -> None:
    """Use every core for intra-op parallelism unless the user pinned a number."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)
