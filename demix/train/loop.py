"""The one training loop: base pretraining, components, references and final models.

Read it top to bottom in `train_model`. A checkpoint holds everything an exact resume needs
(model, optimizer, data position, RNG, step); the learning rate is a pure function of the step.
The loop runs under accelerate's Accelerator: one process as it is, or several started by
`accelerate launch` (DDP, or FSDP with train.fsdp), each reading its own rows of the same global
batch; the main process alone writes checkpoints and the model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from demix.checkpoint import read_model_manifest
from demix.config import ArchitectureConfig, ModelConfig, StageTraining, TrainConfig
from demix.data.shards import CuratedData, MixtureSampler
from demix.distributed import make_accelerator
from demix.memory_plans import shape_of_architecture, shape_of_folder, training_plan
from demix.model import build_tiny_llama, load_model, resolve_device, save_model
from demix.progress import progress
from demix.train.curves import CurveRecorder, write_curve_files
from demix.train.job import finished, job_fingerprint
from demix.train.state import (
    BRANCH_OPTIMIZER,
    TrainingError,
    branch_optimizer_tensors,
    carry_optimizer_state,
    is_fsdp,
    resume,
    save_checkpoint,
)

log = logging.getLogger(__name__)

# Runs after each checkpoint is saved (publishes the checkpoints of a gs:// output).
CheckpointHook = Callable[[Path], None] | None


def lr_at(step: int, total_steps: int, stage: StageTraining) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr (reached at step total_steps), or
    under schedule wsd the peak lr to the end (the stable phase of a branch point)."""
    warmup = int(stage.warmup_fraction * total_steps)
    if step < warmup:
        return stage.lr * (step + 1) / warmup
    if stage.schedule == "wsd":
        return stage.lr
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
    on_checkpoint: CheckpointHook = None,
) -> dict | None:
    """Train from `init` (or a fresh tiny Llama) on the data mixture `weights`; save an HF folder.

    Skips work when `out` already holds a model with the same fingerprint; resumes from
    `<out>.ckpt` when present. With stop_at_step it checkpoints at that step and returns None
    (used to test exact resume). `on_checkpoint(folder)` runs after each checkpoint is saved
    (it publishes checkpoints of a gs:// output). Returns the output manifest.
    Under `accelerate launch` every process calls it alike: each reads its rows of every global
    batch; the main process alone writes checkpoints (and calls on_checkpoint) and the model.
    Under `stage.schedule: wsd` the model is saved with its optimizer state (a branch point);
    `stage.optimizer: carried` starts from the optimizer state saved with `init`.
    Raises TrainingError on a non-finite loss (the last checkpoint is kept) or an init without
    the optimizer state to carry, MixtureError on bad weights, ModelError on a bad init
    folder, ConfigError when train.batch_size does not split over the processes or the
    memory plan (demix.memory_plans) exceeds the device's free memory, before any allocation.
    """
    out = Path(out)
    ckpt = out.with_name(out.name + ".ckpt")
    job_id = job_fingerprint(data, weights, stage, train, seed, role, name, init, arch)
    done = finished(out, job_id)
    if done is not None:
        return done

    accelerator = make_accelerator(train)
    rank, processes = accelerator.process_index, accelerator.num_processes
    micro_rows, micro_steps = train.accumulation(processes)
    main = accelerator.is_main_process
    # One process keeps train.device; launched ones use their own (a GPU each, or the CPU).
    device = resolve_device(train.device) if processes == 1 else accelerator.device
    if init is None and arch is None:
        raise ValueError("train_model needs `init` or `arch`")
    # the memory plan, before any weight is built or read: refused here in one line
    shape = (
        shape_of_folder(init) if init is not None else shape_of_architecture(arch, data.vocab_size)
    )
    plan = training_plan(shape, train, model_cfg.attn_implementation, processes, device).check()
    if main and not quiet:
        log.info("train %s %s: %s", role, name, plan.line)
    tokenizer = data.load_tokenizer()
    if init is None:
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
    if stage.optimizer == "carried":  # a decay branch continuing the base's AdamW moments
        if init is None:
            raise ValueError("train_model: optimizer carried needs `init` (the branch point)")
        carry_optimizer_state(Path(init), accelerator, model, optimizer)
    sampler = MixtureSampler(
        data, weights, train.seq_len, train.batch_size, _sampler_seed(seed, role, name)
    )
    total_steps = max(1, math.ceil(stage.tokens / train.tokens_per_step))

    step, logged, earlier = resume(ckpt, job_id, accelerator, model, optimizer, sampler)
    if step and not quiet and main:
        log.info("train %s %s: resumed at step %d from %s", role, name, step, ckpt)

    bar = progress(total_steps, f"train {role} {name}", "step", step, disable=quiet or not main)
    # loss, lr, gradient norm and tokens/s of each logged step (curves.jsonl, tensorboard/)
    curves = CurveRecorder(logged, train.tokens_per_step)
    t0, tokens_done, running = time.perf_counter(), 0, None
    curves.start(step)
    try:  # the bar ends its line first, so an error message starts on its own line
        while step < total_steps:
            # this process's rows of the global batch, in micro_steps forward passes
            rows = torch.from_numpy(sampler.next_batch(rank, processes)).to(device)
            lr = lr_at(step, total_steps, stage)
            for group in optimizer.param_groups:
                group["lr"] = lr
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
                row = curves.record(step, value, lr, float(grad_norm))
                rate = row["tokens_per_s"] or 0.0
                bar.set_postfix(loss=f"{running:.3f}", tok_s=f"{rate:,.0f}")
            bar.update(1)
            if step == stop_at_step or (step % train.checkpoint_every == 0 and step < total_steps):
                spent = earlier + time.perf_counter() - t0
                save_checkpoint(
                    accelerator, ckpt, job_id, model, optimizer, sampler, step, curves.rows, spent
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
    full = accelerator.get_state_dict(model) if is_fsdp(accelerator) else None
    # a branch point keeps its AdamW state, for branches that carry it (gathered by every process)
    moments = (
        branch_optimizer_tensors(accelerator, model, optimizer) if stage.schedule == "wsd" else None
    )
    if main:
        history = curves.history()
        save_model(
            accelerator.unwrap_model(model),
            tokenizer,
            out,
            extra_files={"training_log.json": json.dumps(history)},
            write_extra=lambda folder: write_curve_files(folder, curves.rows),
            state_dict=full,
            extra_tensors={BRANCH_OPTIMIZER: moments} if moments is not None else None,
            role=role,
            name=name,
            fingerprint=job_id,
            # the model it branched from (its fingerprint, or the folder of a user's base)
            init=read_model_manifest(init).get("fingerprint", str(init)) if init else None,
            schedule=stage.schedule,
            optimizer=stage.optimizer if init else "fresh",
            lr_end=lr_at(total_steps, total_steps, stage),  # the schedule at its end
            weights=weights,
            steps=total_steps,
            tokens=total_steps * train.tokens_per_step,
            seed=seed,
            final_loss=history[-1]["loss"] if history else None,
            tokens_per_s=round(tokens_done / elapsed, 1) if elapsed > 0 else None,
            seconds=round(earlier + elapsed, 1),  # every run of the job, resumed or not
            processes=processes,
        )
        shutil.rmtree(ckpt, ignore_errors=True)
    accelerator.wait_for_everyone()
    return read_model_manifest(out)
