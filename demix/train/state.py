"""Checkpoint state of the training loop: everything an exact resume needs, as safetensors + JSON.

A checkpoint folder (`<out>.ckpt`) holds model.safetensors (parameters by name),
optimizer.safetensors (AdamW moments by parameter index, and the CPU RNG), state.json (the job
it belongs to, the step, the data sampler's position, optimizer groups, the training curve rows),
the curves as files (curves.jsonl, tensorboard/) and a manifest written last. Nothing is ever
unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from demix.errors import DemixError
from demix.storage import read_manifest, recover_replaced_dir, staged_dir, write_manifest
from demix.train.curves import write_curve_files

CHECKPOINT_KIND = "demix.checkpoint"


class TrainingError(DemixError):
    """Training diverged (non-finite loss) or its checkpoint cannot be read."""


def _full_state(accelerator, model, optimizer) -> tuple[dict, dict]:
    """(parameters by name, optimizer state_dict with integer parameter ids) of the whole model.

    Under FSDP both are gathered (every process must call this) and complete on the main
    process only; otherwise every process holds them already (DDP keeps replicas identical).
    """
    if not is_fsdp(accelerator):
        # named_parameters lists tied weights once (safetensors refuses shared storage)
        params = {k: p.detach() for k, p in accelerator.unwrap_model(model).named_parameters()}
        return params, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    names = _param_names(optimizer)
    state = accelerator.get_state_dict(model)
    params = {k: v for k, v in state.items() if k in set(names)}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    opt = get_optimizer_state_dict(model, optimizer.optimizer, options=options)
    index = {name: i for i, name in enumerate(names)}
    return params, {
        "state": {index[k]: v for k, v in opt.get("state", {}).items()},
        "param_groups": [
            {**g, "params": [index[n] for n in g["params"]]} for g in opt.get("param_groups", [])
        ],
    }


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def _param_names(optimizer) -> list[str]:
    """Parameter names in optimizer order (the integer ids of a saved optimizer state)."""
    return [name for group in optimizer.param_groups for name in group["names"]]


def save_checkpoint(
    accelerator,
    ckpt: Path,
    job_id: str,
    model,
    optimizer,
    sampler,
    step: int,
    curves: list,
    seconds: float = 0.0,
) -> None:
    """Save the checkpoint of `step` at `ckpt` (the main process writes; every process gathers),
    with the training curves so far (also as files: TensorBoard shows a run in progress) and
    the seconds of training up to it (over every resumed run of the job)."""
    params, opt = _full_state(accelerator, model, optimizer)
    if not accelerator.is_main_process:
        return
    with staged_dir(ckpt) as tmp:
        save_file({k: p.contiguous() for k, p in params.items()}, tmp / "model.safetensors")
        tensors = {
            f"{idx}.{key}": value.contiguous()
            for idx, state in opt["state"].items()
            for key, value in state.items()
        }
        # Every process seeds alike and draws alike, so the main process's RNG is everyone's.
        tensors["rng.torch_cpu"] = torch.get_rng_state()
        save_file(tensors, tmp / "optimizer.safetensors")
        state = {
            "job": job_id,
            "step": step,
            "sampler": sampler.state_dict(),
            "param_groups": [
                {k: v for k, v in g.items() if k != "names"} for g in opt["param_groups"]
            ],
            "curves": curves,
            "seconds": round(seconds, 3),
        }
        (tmp / "state.json").write_text(json.dumps(state))
        write_curve_files(tmp, curves)
        write_manifest(tmp, CHECKPOINT_KIND, step=step)


def checkpoint_job(ckpt: Path) -> str | None:
    """The job id a checkpoint was saved for (None when its state is unreadable)."""
    try:
        return json.loads((ckpt / "state.json").read_text()).get("job")
    except (OSError, ValueError, AttributeError):
        return None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, parsed as safetensors only (never unpickled).

    Raises TrainingError naming the file when it is not a safetensors file.
    """
    try:
        return load_file(path)
    except Exception as err:  # noqa: BLE001 (SafetensorError, OSError: one line, not a traceback)
        raise TrainingError(
            f"{path}: not a readable safetensors checkpoint ({type(err).__name__}); delete "
            f"{path.parent} to train from the start"
        ) from None


def load_checkpoint(ckpt: Path, accelerator, model, optimizer, sampler) -> tuple[int, list, float]:
    """Restore a checkpoint on every process (each reads the folder; FSDP scatters its shards);
    (step, training curve rows, seconds of training up to it)."""
    read_manifest(ckpt, kind=CHECKPOINT_KIND, verify=True)
    params = _load_tensors(ckpt / "model.safetensors")
    tensors = _load_tensors(ckpt / "optimizer.safetensors")
    torch.set_rng_state(tensors.pop("rng.torch_cpu"))
    state = json.loads((ckpt / "state.json").read_text())
    opt_state: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = value
    names = [group["names"] for group in optimizer.param_groups]
    groups = [{**g, "names": n} for g, n in zip(state["param_groups"], names, strict=True)]
    if is_fsdp(accelerator):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, params, options=options)
    else:
        live = dict(accelerator.unwrap_model(model).named_parameters())
        with torch.no_grad():
            for name, value in params.items():
                live[name].copy_(value)
    _set_optimizer_state(accelerator, model, optimizer, opt_state, groups)
    sampler.load_state_dict(state["sampler"])
    # a checkpoint of an earlier version holds the loss history without the timing
    rows = state.get("curves", state.get("history", []))
    return state["step"], rows, float(state.get("seconds", 0.0))


def _set_optimizer_state(accelerator, model, optimizer, opt_state: dict, groups: list) -> None:
    """Load AdamW state {parameter index: {moment: tensor}} with `groups` (each listing its
    parameter `names`) into the optimizer, on every process (FSDP scatters its shards)."""
    if is_fsdp(accelerator):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, strict=False)
        order = _param_names(optimizer)
        by_name = {
            "state": {order[i]: v for i, v in opt_state.items()},
            "param_groups": [{**g, "params": g["names"]} for g in groups],
        }
        set_optimizer_state_dict(model, optimizer.optimizer, by_name, options=options)
    else:
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})


# The AdamW state a branch point is saved with (in a subfolder: a model folder's own
# *.safetensors are its weights), by parameter name.
BRANCH_OPTIMIZER = "optimizer/optimizer.safetensors"


def branch_optimizer_tensors(accelerator, model, optimizer) -> dict[str, torch.Tensor] | None:
    """The optimizer state as {"<parameter name>.<moment>": tensor}, for the model folder of a
    branch point; every process must call it (FSDP gathers), the main process gets the tensors,
    the others None."""
    _, opt = _full_state(accelerator, model, optimizer)
    if not accelerator.is_main_process:
        return None
    names = _param_names(optimizer)
    return {
        f"{names[idx]}.{key}": value.detach().contiguous().cpu()
        for idx, state in opt["state"].items()
        for key, value in state.items()
    }


def carry_optimizer_state(branch_point: Path, accelerator, model, optimizer) -> None:
    """Load the AdamW state saved with `branch_point` into a fresh optimizer (the moments and
    step count; the learning rate and weight decay stay the branch's own).

    Raises TrainingError when the branch point has no optimizer state or it does not cover
    every trained parameter.
    """
    path = Path(branch_point) / BRANCH_OPTIMIZER
    if not path.is_file():
        raise TrainingError(
            f"{branch_point}: no optimizer state saved with this base ({BRANCH_OPTIMIZER}); "
            "`optimizer: carried` needs a base trained by demix with train.base.schedule: wsd; "
            "set the branch roles' optimizer: fresh"
        )
    by_name: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in _load_tensors(path).items():
        name, moment = key.rsplit(".", 1)
        by_name.setdefault(name, {})[moment] = value
    names = _param_names(optimizer)
    missing = [n for n in names if n not in by_name]
    if missing:
        raise TrainingError(
            f"{path}: no optimizer state for {missing[:3]} ({len(missing)} parameters); was "
            "this base trained with this architecture? Set optimizer: fresh"
        )
    groups = optimizer.state_dict()["param_groups"]
    state = {i: by_name[n] for i, n in enumerate(names)}
    _set_optimizer_state(accelerator, model, optimizer, state, groups)


def resume(
    ckpt: Path, job_id: str, accelerator, model, optimizer, sampler
) -> tuple[int, list, float]:
    """(step, training curve rows, seconds of training so far) of job `job_id`'s checkpoint at
    `ckpt`, restored into the model, optimizer and sampler; (0, [], 0.0) when there is none. A
    checkpoint of another job (changed config or data) is never resumed."""
    if accelerator.is_main_process:
        recover_replaced_dir(ckpt)  # a kill between the two renames of a checkpoint save
    accelerator.wait_for_everyone()
    if (ckpt / "manifest.json").is_file() and checkpoint_job(ckpt) == job_id:
        return load_checkpoint(ckpt, accelerator, model, optimizer, sampler)
    return 0, [], 0.0
