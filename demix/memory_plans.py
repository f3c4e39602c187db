"""Memory plans of training and of the search's candidate pool, counted before anything is
allocated and refused in one line when they exceed the memory there is.

The merge has its own plan (demix.merge.plan); these two follow it: the bytes are counted
from the config and the model's shape (config.json and the safetensors headers, no weight
read), then compared with the free memory of the device the work runs on: the GPU's when
training on CUDA, else the host's available memory (demix.device_memory). A plan over it is a
ConfigError naming both numbers and what to change, raised by `demix check-config` (which
prints every plan), by the commands before they create an output, and by the training loop
and the search before they allocate.

What a training plan counts, per training process (`training_plan`):

- weights: every parameter in float32 (models are trained from float32 master weights,
  whatever train.dtype; bfloat16 is autocast), 4 bytes each;
- gradients: 4 bytes per parameter;
- AdamW: its two moments, 8 bytes per parameter, and the step's scratch (the foreach update
  keeps one parameter-sized float32 temporary), 4 bytes;
- under bfloat16 autocast, the bfloat16 copy of the weights cached for forward and backward,
  2 bytes per parameter; under DDP (several processes, no FSDP), the gradient buckets, 4
  bytes per parameter; under FSDP the per-parameter terms are divided by the processes and
  one layer is gathered whole;
- activations kept for backward, at micro-batch rows x seq_len tokens in the activation dtype
  (e = 2 bytes under bfloat16, 4 under float32), per token and decoder layer h(16 + 9e) +
  4ie bytes (the float32 residual stream and norms, q, k, v and their rotary copies, the
  attention output and projection; the gate, up, activation and product of a gated MLP), plus
  with eager attention a x seq_len x (4e + 4) bytes (scores, masked scores, float32
  probabilities and their cast); the logits cost V(2e + 12) bytes per token (the logits,
  their float32 copy, log-softmax and both gradients), and two more layers are counted for
  backward's working buffers.

The activation terms are an estimate of a Llama-style decoder (what demix builds; other
architectures are counted by the same shape), not a bound: CUDA context and kernels'
workspaces are not counted, and neither is the Python process itself. On a CPU the whole plan
came within 20% of the peak resident memory a training step of the tiny Llama added (four
shapes, 0.3-1.3 GB, eager and sdpa attention; allocator slack included).

What a search plan counts (`search_plan`): the candidate pool of search.candidates mixtures
over D datasets, as sampled: 136 D + 256 bytes per candidate at the sampler's peak (its draws
of twice the pool, the capping and rounding arrays, the set of rows seen; measured with
tracemalloc for 3 to 24 datasets), then 16 D + 8 (k + 3) bytes per candidate for the pool's
float copy, the regressor's input and the predictions of its k targets (k: the evaluated
tasks, at most). The search's host memory is the host's, whatever the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from demix.config import ArchitectureConfig, TrainConfig
from demix.device_memory import host_available_bytes
from demix.errors import ConfigError

GB = 1e9
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# The candidate pool's bytes per candidate (see the module docstring): sampler peak, then after.
POOL_BYTES_PER_DATASET = 136
POOL_BYTES_PER_CANDIDATE = 256
RANKED_BYTES_PER_DATASET = 16


def _size(n: float) -> str:
    if n >= 0.1 * GB:
        return f"{n / GB:.1f} GB"
    return f"{n / 1e6:.1f} MB"


@dataclass(frozen=True)
class MemoryPlan:
    """The bytes a piece of work needs (`parts`, by what holds them) against the memory
    `available` where it runs (None: unknown, not refused)."""

    what: str  # "training", "search pool"
    detail: str  # what was planned, e.g. the model and batch
    where: str  # "cuda:0", "host memory"
    available: int | None
    parts: dict[str, int] = field(default_factory=dict)
    fixes: str = ""  # what to change when it does not fit

    @property
    def needed(self) -> int:
        """Every counted byte."""
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        """Whether the plan fits the memory available (or that is unknown)."""
        return self.available is None or self.needed <= self.available

    @property
    def line(self) -> str:
        """The plan in one line: needed, available, and its parts."""
        parts = ", ".join(f"{k} {_size(v)}" for k, v in self.parts.items() if v)
        free = "unknown" if self.available is None else _size(self.available)
        return (
            f"{self.what} memory plan: {self.detail} needs {_size(self.needed)} on {self.where} "
            f"({free} available; {parts})"
        )

    def check(self) -> MemoryPlan:
        """The plan itself when it fits.

        Raises ConfigError with the numbers (needed vs available) and what would fit.
        """
        if not self.fits:
            raise ConfigError(
                f"{self.what} memory plan: {self.detail} needs {_size(self.needed)} on "
                f"{self.where} but {_size(self.available)} is available "
                f"({', '.join(f'{k} {_size(v)}' for k, v in self.parts.items() if v)}); "
                f"{self.fixes}"
            )
        return self


@dataclass(frozen=True)
class ModelShape:
    """What a training plan needs of a model: its parameter count and decoder dimensions."""

    parameters: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    source: str  # "model.architecture" or the model folder
    tied: bool = True  # the output layer shares the embedding's weights


def architecture_parameters(arch: ArchitectureConfig, vocab: int) -> int:
    """The parameters of the Llama demix builds from `arch` (demix.model.build_tiny_llama):
    the embedding (and an untied head), per layer the four attention projections (as many
    key/value heads as heads), the gated MLP's three matrices and two norms, a final norm."""
    h, i = arch.hidden_size, arch.intermediate_size
    embeddings = vocab * h * (1 if arch.tie_word_embeddings else 2)
    return embeddings + arch.num_layers * (4 * h * h + 3 * h * i + 2 * h) + h


def shape_of_architecture(arch: ArchitectureConfig, vocab: int) -> ModelShape:
    """The shape of a model built from config with a vocabulary of `vocab` tokens."""
    return ModelShape(
        architecture_parameters(arch, vocab),
        arch.hidden_size,
        arch.num_layers,
        arch.num_heads,
        arch.intermediate_size,
        vocab,
        "model.architecture",
        arch.tie_word_embeddings,
    )


def shape_of_folder(folder: str | Path) -> ModelShape:
    """The shape of a model folder: parameters from its safetensors headers (floating-point
    tensors), dimensions from config.json (a text model's, for a model with several parts).

    Raises ModelError when config.json or a weight file's header cannot be read.
    """
    from demix.checkpoint import read_hf_config, tensor_shapes

    folder = Path(folder)
    config = read_hf_config(folder)
    config = config.get("text_config") if isinstance(config.get("text_config"), dict) else config

    def first(*keys: str, default: int = 0) -> int:
        for key in keys:
            value = config.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return default

    hidden = first("hidden_size", "n_embd", "d_model")
    parameters = sum(
        math.prod(shape) for shape, dtype in tensor_shapes(folder).values() if dtype in FLOAT_DTYPES
    )
    return ModelShape(
        parameters,
        hidden,
        first("num_hidden_layers", "n_layer", "num_layers"),
        first("num_attention_heads", "n_head"),
        first("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
        first("vocab_size"),
        str(folder),
        bool(config.get("tie_word_embeddings", False)),
    )


def _rows_per_pass(train: TrainConfig, processes: int) -> int:
    """Rows of one forward pass of one process (train.micro_batch_size, else its share)."""
    if train.micro_batch_size is not None:
        return train.micro_batch_size
    return max(1, math.ceil(train.batch_size / processes))


def _device(train: TrainConfig, device=None) -> tuple[str, bool, int | None]:
    """(where, bfloat16 training, free bytes there) of `device` (default: train.device on this
    machine): a CUDA device's own memory, else the host's."""
    import torch

    from demix.device_memory import free_memory
    from demix.model import resolve_device, resolve_dtype

    device = torch.device(device) if device is not None else resolve_device(train.device)
    bf16 = resolve_dtype(train.dtype, device) == torch.bfloat16
    free = free_memory(device)[0]
    if device.type == "cuda":  # blocks this process's allocator holds but does not use are free
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return str(device), bf16, free
    return "host memory", bf16, free


def training_plan(
    shape: ModelShape,
    train: TrainConfig,
    attn_implementation: str | None,
    processes: int = 1,
    device=None,
) -> MemoryPlan:
    """The memory one training process needs for `shape` under `train` (see the module
    docstring for what is counted) against the free memory of `device` (a torch device; default
    train.device on this machine), or of (where, bfloat16, free bytes) given as a tuple."""
    where, bf16, free = device if isinstance(device, tuple) else _device(train, device)
    n, h, i, a, v = shape.parameters, shape.hidden, shape.intermediate, shape.heads, shape.vocab
    e = 2 if bf16 else 4
    sharded = processes if train.fsdp and processes > 1 else 1
    rows, s = _rows_per_pass(train, processes), train.seq_len
    per_layer_token = h * (16 + 9 * e) + 4 * i * e
    if attn_implementation == "eager":
        per_layer_token += a * s * (4 * e + 4)
    per_token = (shape.layers + 2) * per_layer_token + v * (2 * e + 12) + 4 * h
    parts = {
        "weights": 4 * n // sharded,
        "gradients": 4 * n // sharded,
        "AdamW": 12 * n // sharded,  # two moments and the step's scratch
        "bf16 weights": 2 * n // sharded if bf16 else 0,
        "DDP buckets": 4 * n if processes > 1 and not train.fsdp else 0,
        "gathered layer": 8 * n // max(1, shape.layers) if sharded > 1 else 0,
        "activations": rows * s * per_token,
    }
    count = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
    runs = f", {processes} processes" if processes > 1 else ""
    precision = "bfloat16" if bf16 else "float32"
    detail = (
        f"a {count}-parameter model ({shape.source}; {precision}, {rows} rows x {s} tokens "
        f"per pass{runs})"
    )
    fixes = (
        "lower train.micro_batch_size or train.seq_len, train a smaller model, or train on a "
        "device with more memory (or more processes with train.fsdp)"
    )
    return MemoryPlan("training", detail, where, free, parts, fixes)


def search_plan(candidates: int, datasets: int, targets: int, what: str = "search") -> MemoryPlan:
    """The host memory of a candidate pool of `candidates` mixtures over `datasets` datasets
    ranked by `targets` regressors (see the module docstring) against the host's available
    memory."""
    d = datasets
    sampled = candidates * (POOL_BYTES_PER_DATASET * d + POOL_BYTES_PER_CANDIDATE)
    ranked = candidates * (RANKED_BYTES_PER_DATASET * d + 8 * (targets + 3))
    key = "decision.candidates" if what == "decision" else "search.candidates"
    return MemoryPlan(
        f"{what} pool",
        f"{candidates:,} candidate mixtures over {d} datasets ({key})",
        "host memory",
        host_available_bytes(),
        {"sampling": sampled, "ranking": ranked},
        f"lower {key}",
    )


def check_plans(plans: list[MemoryPlan]) -> list[MemoryPlan]:
    """The plans, each checked in order.

    Raises ConfigError naming the first plan that does not fit, with its numbers.
    """
    return [p.check() for p in plans]


__all__ = [
    "MemoryPlan",
    "ModelShape",
    "architecture_parameters",
    "check_plans",
    "search_plan",
    "shape_of_architecture",
    "shape_of_folder",
    "training_plan",
]
