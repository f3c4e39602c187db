"""Write one merged model to disk, streaming tensor by tensor from safetensors."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from demix.merge.delta_stack import TensorIndex
from demix.merge.methods import METHODS
from demix.model import MODEL_KIND, check_compatible, copy_model_files
from demix.storage import staged_dir, write_manifest


def merge_to_disk(
    base: str | Path,
    components: list[str | Path],
    weights,
    out: str | Path,
    method: str = "linear",
    dtype: torch.dtype | None = None,
    **manifest_fields,
) -> dict:
    """Merge `components` onto `base` with component weights; save an HF folder atomically.

    Holds one tensor per component at a time besides the output. Raises ModelError for
    incompatible models and MixtureError for weights the method refuses.
    """
    base = Path(base)
    check_compatible(base, components)
    merge = METHODS[method]
    base_index = TensorIndex(base)
    indexes = [TensorIndex(c) for c in components]
    merged: dict[str, torch.Tensor] = {}
    for name in base_index.names():
        b = base_index.get(name)
        out_dtype = dtype or b.dtype
        merged[name] = (
            merge(b, [ix.get(name) for ix in indexes], weights).to(out_dtype).contiguous()
        )
    with staged_dir(out) as tmp:
        save_file(merged, tmp / "model.safetensors", metadata={"format": "pt"})
        copy_model_files(base, tmp)
        manifest = write_manifest(
            tmp,
            MODEL_KIND,
            role="merged",
            method=method,
            component_weights=[float(w) for w in weights],
            components=[str(c) for c in components],
            base=str(base),
            **manifest_fields,
        )
    return manifest
