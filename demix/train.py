"""The one training loop: base pretraining, components, references and final models.

Read it top to bottom in `train_model`. A checkpoint holds everything an exact resume needs
(model, optimizer, data position, RNG, step); the learning rate is a pure function of the step.
The loop runs under accelerate's Accelerator: one process as it is, or several started by
`accelerate launch` (DDP, or FSDP with train.fsdp), each reading its own rows of the same global
batch; the main process alone writes checkpoints and the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from demix.checkpoint import read_model_manifest
from demix.config import ArchitectureConfig, ModelConfig, StageTraining, TrainConfig
from demix.data.shards import CuratedData, MixtureSampler
from demix.distributed import make_accelerator
from demix.errors import DemixError
from demix.model import build_tiny_llama, load_model, resolve_device, save_model
from demix.storage import read_manifest, recover_replaced_dir, staged_dir, write_manifest

CHECKPOINT_KIND = "demix.checkpoint"


class TrainingError(DemixError):
    """Training diverged (non-finite loss)."""


def lr_at(step: int, total_steps: int, stage: StageTraining) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr."""
    warmup = int(stage.warmup_fraction * total_steps)
    if step < warmup:
        return stage.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return stage.lr * (stage.min_lr_ratio + (1 - stage.min_lr_ratio) * cosine)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices decay, vectors do not; each group also lists its parameter names."""
    decay, no_decay = ([], []), ([], [])
    for name, p in model.named_parameters():
        if p.requires_grad:
            params, names = decay if p.dim() >= 2 else no_decay
            params.append(p)
            names.append(name)
    return [
        {"params": decay[0], "names": decay[1], "weight_decay": weight_decay},
        {"params": no_decay[0], "names": no_decay[1], "weight_decay": 0.0},
    ]


def _sampler_seed(seed: int, role: str, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(f"{role}:{name}".encode())) % (2**32)


def _full_state(accelerator, model, optimizer) -> tuple[dict, dict]:
    """(parameters by name, optimizer state_dict with integer parameter ids) of the whole model.

    Under FSDP both are gathered (every process must call this) and complete on the main
    process only; otherwise every process holds them already (DDP keeps replicas identical).
    """
    if not _is_fsdp(accelerator):
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


def _is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def _param_names(optimizer) -> list[str]:
    """Parameter names in optimizer order (the integer ids of a saved optimizer state)."""
    return [name for group in optimizer.param_groups for name in group["names"]]


def _save_checkpoint(
    accelerator, ckpt: Path, job_id: str, model, optimizer, sampler, step: int, history: list
) -> None:
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
            "history": history,
        }
        (tmp / "state.json").write_text(json.dumps(state))
        write_manifest(tmp, CHECKPOINT_KIND, step=step)


def _checkpoint_job(ckpt: Path) -> str | None:
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


def _load_checkpoint(ckpt: Path, accelerator, model, optimizer, sampler) -> tuple[int, list]:
    """Restore a checkpoint on every process (each reads the folder; FSDP scatters its shards)."""
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
    if _is_fsdp(accelerator):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, params, options=options)
        order = _param_names(optimizer)
        by_name = {
            "state": {order[i]: v for i, v in opt_state.items()},
            "param_groups": [{**g, "params": g["names"]} for g in groups],
        }
        set_optimizer_state_dict(model, optimizer.optimizer, by_name, options=options)
    else:
        live = dict(accelerator.unwrap_model(model).named_parameters())
        with torch.no_grad():
            for name, value in params.items():
                live[name].copy_(value)
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    sampler.load_state_dict(state["sampler"])
    return state["step"], state["history"]


def fingerprint(**parts) -> str:
    """Stable hash of a job's inputs: same inputs -> same outputs (resume and cache key)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_model(
    out: str | Path,
    data: CuratedData,
    weights: dict[str, float],
    stage: StageTraining,
    train: TrainConfig,
    model_cfg: ModelConfig,
    seed: int,
    role: str,
    name: str,
    init: str | Path | None = None,
    arch: ArchitectureConfig | None = None,
    stop_at_step: int | None = None,
    quiet: bool = False,
    on_checkpoint: Callable[[Path], None] | None = None,
) -> dict | None:
    """Train from `init` (or a fresh tiny Llama) on the data mixture `weights`; save an HF folder.

    Skips work when `out` already holds a model with the same fingerprint; resumes from
    `<out>.ckpt` when present. With stop_at_step it checkpoints at that step and returns None
    (used to test exact resume). `on_checkpoint(folder)` runs after each checkpoint is saved
    (it publishes checkpoints of a gs:// output). Returns the output manifest.
    Under `accelerate launch` every process calls it alike: each reads its rows of every global
    batch; the main process alone writes checkpoints (and calls on_checkpoint) and the model.
    Raises TrainingError on a non-finite loss (the last checkpoint is kept), MixtureError on
    bad weights, ModelError on a bad init folder, ConfigError when train.batch_size does not
    split over the processes.
    """
    out = Path(out)
    ckpt = out.with_name(out.name + ".ckpt")
    init_id = read_model_manifest(init).get("fingerprint", str(init)) if init else None
    job_id = fingerprint(
        role=role,
        name=name,
        weights=weights,
        stage=stage.model_dump(),
        seed=seed,
        init=init_id,
        # how the global batch is computed (processes, micro-batches, sharding) is not the job
        train=train.model_dump(
            exclude={
                "base",
                "component",
                "final",
                "checkpoint_every",
                "log_every",
                "micro_batch_size",
                "fsdp",
            }
        ),
        data=read_manifest(data.root).get("files"),
        arch=arch.model_dump() if arch else None,
    )
    if (out / "manifest.json").is_file() and read_model_manifest(out).get("fingerprint") == job_id:
        return read_model_manifest(out)

    accelerator = make_accelerator(train)
    rank, processes = accelerator.process_index, accelerator.num_processes
    micro_rows, micro_steps = train.accumulation(processes)
    main = accelerator.is_main_process
    # One process keeps train.device; launched ones use their own (a GPU each, or the CPU).
    device = resolve_device(train.device) if processes == 1 else accelerator.device
    tokenizer = data.load_tokenizer()
    if init is None:
        if arch is None:
            raise ValueError("train_model needs `init` or `arch`")
        model = build_tiny_llama(arch, data.vocab_size, data.eos_token_id, seed).to(device)
    else:
        model = load_model(
            init, device, torch.float32, model_cfg.trust_remote_code, model_cfg.attn_implementation
        )
    model.train()
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(
        _param_groups(model, train.weight_decay),
        lr=stage.lr,
        betas=(train.beta1, train.beta2),
        foreach=True,
    )
    # DDP / FSDP wrapping and bf16 autocast (train.dtype) when configured; one fp32 process: none
    model, optimizer = accelerator.prepare(model, optimizer)
    sampler = MixtureSampler(
        data, weights, train.seq_len, train.batch_size, _sampler_seed(seed, role, name)
    )
    total_steps = max(1, math.ceil(stage.tokens / train.tokens_per_step))

    step, history = 0, []
    if main:
        recover_replaced_dir(ckpt)  # a kill between the two renames of a checkpoint save
    accelerator.wait_for_everyone()
    # A checkpoint of a different job (changed config or data) is never resumed.
    if (ckpt / "manifest.json").is_file() and _checkpoint_job(ckpt) == job_id:
        step, history = _load_checkpoint(ckpt, accelerator, model, optimizer, sampler)
        if not quiet and main:
            print(
                f"[demix] train {role} {name}: resumed at step {step} from {ckpt}", file=sys.stderr
            )

    bar = tqdm(
        total=total_steps,
        initial=step,
        desc=f"train {role} {name}",
        unit="step",
        file=sys.stderr,
        disable=quiet or not main,
        dynamic_ncols=True,
        mininterval=1.0 if sys.stderr.isatty() else 30.0,
    )
    t0, tokens_done, running = time.perf_counter(), 0, None
    try:  # the bar ends its line first, so an error message starts on its own line
        while step < total_steps:
            # this process's rows of the global batch, in micro_steps forward passes
            rows = torch.from_numpy(sampler.next_batch(rank, processes)).to(device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, stage)
            step_loss = None
            for micro in range(micro_steps):
                batch = rows[micro * micro_rows : (micro + 1) * micro_rows]
                inputs, targets = batch[:, :-1], batch[:, 1:]
                # gradients are averaged over processes once per step, on the last pass
                last = micro == micro_steps - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(model):
                    logits = model(input_ids=inputs).logits
                    loss = F.cross_entropy(
                        logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1)
                    )
                    # every pass has the same token count: the mean of the passes' means (and
                    # DDP's mean over processes) is the mean over the global batch
                    accelerator.backward(loss / micro_steps if micro_steps > 1 else loss)
                part = loss.detach()
                step_loss = part if step_loss is None else step_loss + part
            if micro_steps > 1:
                step_loss = step_loss / micro_steps
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            if processes > 1:  # the loss of the global batch, the same on every process
                step_loss = accelerator.reduce(step_loss, reduction="mean")
            value = step_loss.item()
            if not math.isfinite(value):
                raise TrainingError(
                    f"{role} {name}: loss is {value} at step {step + 1}; the last good checkpoint is kept "
                    f"in {ckpt} (lower train.{role}.lr or raise train.grad_clip)"
                )
            step += 1
            tokens_done += train.tokens_per_step
            running = value if running is None else 0.9 * running + 0.1 * value
            if step % train.log_every == 0 or step == total_steps:
                # the norm of the global batch's gradient, before clipping
                norm = round(float(grad_norm), 5)
                history.append({"step": step, "loss": round(value, 5), "grad_norm": norm})
                rate = tokens_done / max(1e-9, time.perf_counter() - t0)
                bar.set_postfix(loss=f"{running:.3f}", tok_s=f"{rate:,.0f}", refresh=False)
            bar.update(1)
            if step == stop_at_step or (step % train.checkpoint_every == 0 and step < total_steps):
                _save_checkpoint(
                    accelerator, ckpt, job_id, model, optimizer, sampler, step, history
                )
                if on_checkpoint is not None and main:
                    on_checkpoint(ckpt)
                accelerator.wait_for_everyone()
            if step == stop_at_step:
                return None
    finally:
        bar.close()

    elapsed = time.perf_counter() - t0
    # FSDP: the full weights, gathered by every process (None: the model's own tensors)
    full = accelerator.get_state_dict(model) if _is_fsdp(accelerator) else None
    if main:
        save_model(
            accelerator.unwrap_model(model),
            tokenizer,
            out,
            extra_files={"training_log.json": json.dumps(history)},
            state_dict=full,
            role=role,
            name=name,
            fingerprint=job_id,
            weights=weights,
            steps=total_steps,
            tokens=total_steps * train.tokens_per_step,
            seed=seed,
            final_loss=history[-1]["loss"] if history else None,
            tokens_per_s=round(tokens_done / elapsed, 1) if elapsed > 0 else None,
            seconds=round(elapsed, 1),
            processes=processes,
        )
        shutil.rmtree(ckpt, ignore_errors=True)
    accelerator.wait_for_everyone()
    return read_model_manifest(out)


def component_weights(
    names: list[str], target: str, general: np.ndarray, general_ratio: float
) -> dict[str, float]:
    """Training mix of the component for `target`: general_ratio general data + the rest target."""
    mix = general_ratio * general
    mix[names.index(target)] += 1 - general_ratio
    return {n: float(w) for n, w in zip(names, mix, strict=True)}
