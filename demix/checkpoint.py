"""Model folders on disk, read without loading them: weight files, tensor headers, per-tensor
views, compatibility checks, manifests. Nothing here imports torch or transformers, so merging
and checking checkpoints start in a fraction of a second."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from demix.errors import ModelError
from demix.safetensors_io import MappedSafetensors
from demix.storage import MANIFEST, read_manifest

MODEL_KIND = "demix.model"
# A component model manifest's ||theta - base|| / ||base|| (recorded after training).
RELATIVE_DELTA_NORM = "relative_delta_norm"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# A trained model's training curves, one JSON row per logged step (demix.train.curves).
CURVES_FILE = "curves.jsonl"


def _is_weight_file(rel: str) -> bool:
    """Whether a model folder's file is weights: a *.safetensors file at the top."""
    return "/" not in rel and rel.endswith(".safetensors")


def safetensors_files(folder: Path) -> list[Path]:
    """The model's safetensors files; refuse pickle-only checkpoints. A demix model artifact
    is verified against its manifest first (demix.storage.verify_artifact) and only the weight
    files it lists are returned.

    Raises ModelError when the folder is missing or holds no safetensors weights; DataError
    when an artifact is not exactly its manifest.
    """
    if not folder.is_dir():
        raise ModelError(f"{folder}: model folder does not exist")
    if (folder / MANIFEST).is_file():  # a demix artifact: exactly the weight files it lists
        listed = read_manifest(folder, MODEL_KIND, verify=True)["files"]
        files = [folder / rel for rel in sorted(listed) if _is_weight_file(rel)]
    else:  # a user's Hugging Face folder
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


def check_weight_files(folder: Path) -> list[Path]:
    """The model's safetensors files, every header checked by demix's own reader (offsets,
    sizes, dtypes) and the shard index, when there is one, naming only files that exist: what a
    library would otherwise fail on with a traceback, found before any library loads them.

    Raises ModelError naming the file and what is wrong.
    """
    files = safetensors_files(folder)
    for path in files:
        MappedSafetensors(path)  # raises on a header, offset or size that is wrong
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise ModelError(f"{index}: expected a 'weight_map' of tensor names to file names")
        names = {p.name for p in files}
        missing = sorted(set(weight_map.values()) - names)
        if missing:
            raise ModelError(
                f"{index}: names weight files that are not in {folder}: {missing[:3]}; copy "
                "the whole model folder"
            )
    return files


def _read_json(path: Path) -> dict:
    """A JSON object from a file of a model folder.

    Raises ModelError naming the file when it is unreadable, not JSON or not an object.
    """
    try:
        data = json.loads(path.read_bytes())
    except OSError as err:
        raise ModelError(f"{path}: cannot read it ({err.strerror})") from None
    except RecursionError:
        raise ModelError(f"{path}: not valid JSON (nested too deeply)") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, too many digits
        raise ModelError(f"{path}: not valid JSON ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return data


def copy_model_files(src: Path, dst: Path) -> None:
    """Copy config, generation config and tokenizer files (everything but weights) of a model;
    not its training curves (a merge was not trained)."""
    for p in src.iterdir():
        if (
            p.is_file()
            and p.suffix != ".safetensors"
            and p.name not in ("manifest.json", CURVES_FILE)
            and not p.name.endswith(".index.json")
        ):
            shutil.copy2(p, dst / p.name)


def tensor_shapes(folder: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, dtype) read from safetensors headers, without loading weights."""
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for f in safetensors_files(folder):
        for name, (dtype, shape, _, _) in MappedSafetensors(f).entries.items():
            shapes[name] = (shape, dtype)
    return shapes


class TensorIndex:
    """Per-tensor access to a (possibly sharded) safetensors model folder, each file mapped once.

    `array` (numpy) and `get` (torch) return zero-copy views of the page cache; `release` drops
    their pages from this process.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.location: dict[str, MappedSafetensors] = {}
        for f in safetensors_files(self.folder):
            mapped = MappedSafetensors(f)
            for name in mapped.names():
                self.location[name] = mapped

    def names(self) -> list[str]:
        return list(self.location)

    def _file(self, name: str) -> MappedSafetensors:
        if name not in self.location:
            raise ModelError(f"{self.folder}: no tensor named {name}")
        return self.location[name]

    def dtype(self, name: str) -> str:
        """The stored dtype's safetensors name ("F32", "BF16", ...)."""
        return self._file(name).entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).entries[name][1]

    def array(self, name: str) -> np.ndarray:
        """One tensor as a read-only numpy view (BF16 as uint16 bit patterns).

        Raises ModelError when the model has no tensor of that name.
        """
        return self._file(name).array(name)

    def get(self, name: str):
        """One tensor as a torch view (imports torch; copy before changing it in place)."""
        return self._file(name).tensor(name)

    def release(self, name: str, start: int = 0, stop: int | None = None) -> None:
        """Drop the pages of elements [start, stop) of tensor `name` from this process (views
        of it stay valid)."""
        self._file(name).release(name, start, stop)


def read_hf_config(folder: Path) -> dict:
    """A model folder's config.json as a dict.

    Raises ModelError when it is missing, unreadable or not a JSON object.
    """
    path = Path(folder) / "config.json"
    if not path.exists():
        raise ModelError(f"{folder}: no config.json; expected a Hugging Face model folder")
    return _read_json(path)


def _tokenizer_fingerprint(folder: Path) -> str | None:
    """The vocabulary and added tokens of a folder's tokenizer.json (None without one).

    Raises ModelError naming the file when it is not a JSON object.
    """
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    data = _read_json(path)
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


def manifest_total(folders, field: str) -> float:
    """The sum of a numeric manifest field over model folders (0 where it is missing)."""
    return sum(read_model_manifest(folder).get(field) or 0 for folder in folders)
