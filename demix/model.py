"""Build, load and save Hugging Face causal LMs and their tokenizers (safetensors only)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from demix.config import ArchitectureConfig
from demix.errors import ModelError
from demix.storage import read_manifest, staged_dir, write_manifest

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

# transformers is imported where a model or tokenizer is built or loaded, not at import time:
# it takes about 2 s, and merging, checking and hashing checkpoints never need it.

log = logging.getLogger(__name__)

MODEL_KIND = "demix.model"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


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


def safetensors_files(folder: Path) -> list[Path]:
    """The model's safetensors files; refuse pickle-only checkpoints.

    Raises ModelError when the folder is missing or holds no safetensors weights.
    """
    if not folder.is_dir():
        raise ModelError(f"{folder}: model folder does not exist")
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelError(
            f"{folder}: only pickle checkpoints ({', '.join(pickles)}); DeMix loads safetensors only "
            "(convert with `model.save_pretrained(dir, safe_serialization=True)` in a trusted environment)"
        )
    raise ModelError(
        f"{folder}: no *.safetensors weights found; save the model with "
        "`save_pretrained(dir, safe_serialization=True)`"
    )


def load_model(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    attn_implementation: str | None = "eager",
):
    """Load any AutoModelForCausalLM folder from safetensors, never from pickle.

    Raises ModelError when the folder has no config.json or no safetensors weights.
    """
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    folder = Path(path)
    safetensors_files(folder)
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder}: no config.json; expected a Hugging Face model folder")
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
    except (OSError, ValueError) as err:
        raise ModelError(f"{folder}: cannot load model ({str(err).splitlines()[0]})") from None
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
    except (OSError, ValueError) as err:
        raise ModelError(f"{path}: cannot load tokenizer ({str(err).splitlines()[0]})") from None


def save_model(
    model,
    tokenizer,
    out: str | Path,
    extra_files: dict[str, str] | None = None,
    state_dict: dict | None = None,
    **manifest_fields,
) -> dict:
    """Save an HF folder (config, safetensors, tokenizer, extra text files) atomically, manifest last.

    `state_dict` replaces the model's own tensors (the gathered weights of a sharded model).
    """
    out = Path(out)
    _quiet_transformers()
    with staged_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        manifest = write_manifest(tmp, MODEL_KIND, **manifest_fields)
    return manifest


def copy_model_files(src: Path, dst: Path) -> None:
    """Copy config, generation config and tokenizer files (everything but weights) of a model."""
    for p in src.iterdir():
        if (
            p.is_file()
            and p.suffix != ".safetensors"
            and p.name != "manifest.json"
            and not p.name.endswith(".index.json")
        ):
            shutil.copy2(p, dst / p.name)


def tensor_shapes(folder: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, dtype) read from safetensors headers, without loading weights."""
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for f in safetensors_files(folder):
        with safe_open(f, framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                sl = st.get_slice(name)
                shapes[name] = (tuple(sl.get_shape()), sl.get_dtype())
    return shapes


def read_hf_config(folder: Path) -> dict:
    """A model folder's config.json as a dict; ModelError when missing or not a JSON object."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(
            f"{folder}: no config.json; expected a Hugging Face model folder"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"{path}: not a readable JSON config ({err})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return config


def _tokenizer_fingerprint(folder: Path) -> str | None:
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return json.dumps(
        {"model": data.get("model"), "added": data.get("added_tokens")}, sort_keys=True
    )


def check_compatible(base: str | Path, others: list[str | Path]) -> None:
    """Refuse models whose architecture, tensor names/shapes or tokenizer differ from the base.

    Raises ModelError naming the first differing model and tensors.
    """
    base = Path(base)
    ref_shapes = tensor_shapes(base)
    ref_cfg = read_hf_config(base)
    ref_tok = _tokenizer_fingerprint(base)
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads")
    for other in map(Path, others):
        cfg = read_hf_config(other)
        for k in keys:
            if cfg.get(k) != ref_cfg.get(k):
                raise ModelError(
                    f"{other}: config {k}={cfg.get(k)} differs from base {base} "
                    f"({ref_cfg.get(k)}); components must be trained from this base"
                )
        shapes = tensor_shapes(other)
        missing = sorted(set(ref_shapes) ^ set(shapes))
        if missing:
            raise ModelError(
                f"{other}: tensor set differs from base {base}: {missing[:3]}; components must "
                "be trained from this base"
            )
        bad = [n for n in ref_shapes if ref_shapes[n][0] != shapes[n][0]]
        if bad:
            n = bad[0]
            raise ModelError(
                f"{other}: tensor {n} has shape {shapes[n][0]}, base has {ref_shapes[n][0]}; "
                "components must be trained from this base"
            )
        if _tokenizer_fingerprint(other) != ref_tok:
            raise ModelError(
                f"{other}: tokenizer differs from base {base}; components must share the base tokenizer"
            )


def read_model_manifest(folder: str | Path) -> dict:
    """A model artifact's manifest; foreign HF folders (no manifest) get an empty dict."""
    folder = Path(folder)
    if (folder / "manifest.json").is_file():
        return read_manifest(folder, kind=MODEL_KIND)
    return {}


def set_threads() -> None:
    """Use every core for intra-op parallelism unless the user pinned a number."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)
