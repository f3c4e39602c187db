"""`demix plan`: what a run of a config will cost, per stage, before anything runs.

Every number follows from the config, the input files' sizes (listed, never read) and a few
stated assumptions, printed with the table:

- Training FLOPs per token: 6 x (parameters outside the embedding + the output layer's) plus
  the attention's 12 x layers x seq_len x hidden (the usual dense-transformer count); an
  evaluated token costs a third of that. Parameters come from the base's safetensors headers
  when it is a local folder, else from the config's architecture.
- Time = FLOPs / (peak x utilisation). On `cpu` the peak is the machine's cores at the float32
  rate of one core of this project's 2-core machine, and the utilisations are what this project
  measured there (`make demo`, quiet); on a GPU the peak is the card's dense bf16 figure and the utilisations
  are assumed (printed as such). Merging a proxy costs what the merge memory plan says.
- Curation reads CURATE_BYTES_PER_S of input per second (measured here), and a token is
  BYTES_PER_TOKEN bytes of input (measured on the demo's corpora with its tokenizer).

The estimate is of work: a pipeline runs a loop's tasks side by side on as many GPUs as it
gets, so its wall time can be shorter; `make demo` runs them one after the other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from demix.config import RunConfig
from demix.errors import DemixError
from demix.memory_plans import ModelShape, shape_of_architecture, shape_of_folder, training_plan
from demix.mixtures import FINAL_LABELS

# Measured on this project's 2-core machine, quiet: `make demo` curated 28.4 MB of JSONL in
# 16.9 s, into 7.7M tokens of its 4096-entry tokenizer (3.4 bytes of input per token).
CURATE_BYTES_PER_S = 1.7e6
BYTES_PER_TOKEN = 3.4
# A document of an evaluation task whose file is not at hand (evaluate.data_dir unset).
ASSUMED_TOKENS_PER_DOCUMENT = 512


@dataclass(frozen=True)
class Accelerator:
    """A device's dense peak FLOP/s in the training dtype, its memory, and the share of the
    peak training and evaluation reach on it (`source`: where those numbers come from)."""

    name: str
    peak_flops: float
    memory_bytes: float
    train_utilisation: float
    eval_utilisation: float
    source: str
    copy_bytes_per_s: float


_GPU_SOURCE = "dense bf16 peak of the data sheet; utilisation assumed, not measured here"
ACCELERATORS = {
    "h100-80gb": Accelerator("NVIDIA H100 80GB", 989e12, 80e9, 0.40, 0.30, _GPU_SOURCE, 2.6e12),
    "h200-141gb": Accelerator("NVIDIA H200 141GB", 989e12, 141e9, 0.40, 0.30, _GPU_SOURCE, 3.8e12),
    "a100-80gb": Accelerator("NVIDIA A100 80GB", 312e12, 80e9, 0.40, 0.30, _GPU_SOURCE, 1.7e12),
    "l4": Accelerator("NVIDIA L4", 121e12, 24e9, 0.40, 0.30, _GPU_SOURCE, 0.25e12),
}
# One core of this project's machine multiplies 512x512 float32 matrices at 100 GFLOP/s (201
# on both cores, best of 200); training and evaluation of the demo's model reached these
# shares of it (`make demo`, quiet: 14.5k training tokens/s; benchmarks/plan_accuracy.py
# prints the plan beside a run's measured stage times).
CPU_FLOPS_PER_CORE = 1.0e11
CPU_TRAIN_UTILISATION = 0.45
CPU_EVAL_UTILISATION = 0.60


def cpu_accelerator() -> Accelerator:
    """This machine's CPU: its cores at the float32 matrix-product rate of one core of this
    project's machine (timing it at plan time reads whatever else the machine is doing)."""
    import os

    cores = os.cpu_count() or 1
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Accelerator(
        f"this machine's CPU ({cores} cores)",
        cores * CPU_FLOPS_PER_CORE,
        float(memory),
        CPU_TRAIN_UTILISATION,
        CPU_EVAL_UTILISATION,
        f"{CPU_FLOPS_PER_CORE / 1e9:.0f} GFLOP/s per core and the utilisations measured by "
        "this project on 2 cores; other CPUs differ",
        1.0e10,
    )


def accelerator(name: str) -> Accelerator:
    """The accelerator called `name` (`cpu` or a key of ACCELERATORS).

    Raises DemixError naming the choices for any other name.
    """
    if name == "cpu":
        return cpu_accelerator()
    if name not in ACCELERATORS:
        raise DemixError(f"--accelerator {name}: give cpu or one of {', '.join(ACCELERATORS)}")
    return ACCELERATORS[name]


def flops_per_token(shape: ModelShape, seq_len: int, training: bool) -> float:
    """Training (forward and backward) or evaluation (forward) FLOPs of one token: the
    embedding lookup costs none, the output layer's product counts (tied or not)."""
    dense = shape.parameters - (0 if shape.tied else shape.vocab * shape.hidden)
    forward = 2 * dense + 4 * shape.layers * seq_len * shape.hidden
    return 3 * forward if training else forward


def base_shape(config: RunConfig) -> ModelShape:
    """The base's shape: a local folder's (config.json and safetensors headers), else the
    architecture's (a gs:// or hub base is not fetched to plan)."""
    if config.model.base is not None and config.model.base_form == "local":
        return shape_of_folder(config.model.base)
    return shape_of_architecture(config.model.architecture, config.data.tokenizer.vocab_size)


@dataclass
class StagePlan:
    """One stage's row of the plan."""

    stage: str
    tasks: int
    tokens: int = 0
    flops: float = 0.0
    proxies: int = 0
    seconds: float = 0.0
    peak_bytes: float = 0.0
    written_bytes: float = 0.0
    gpu: bool = True
    notes: list[str] = field(default_factory=list)


def _input_bytes(config: RunConfig) -> tuple[int | None, int, str]:
    """Bytes of the input files and how many files; (None, 0, why) when they cannot be listed
    (a path not there yet, a bucket out of reach)."""
    from demix.data.sources import input_files

    try:
        files = [f for spec in config.data.all_specs for f in input_files(spec)]
    except DemixError as err:
        return None, 0, str(err)
    return sum(f.size for f in files), len(files), ""


def _eval_tokens(config: RunConfig) -> int:
    """Tokens one evaluation of a model reads: every task of the objective and diagnostics."""
    evaluate = config.evaluate
    total = 0
    for task in dict.fromkeys([*evaluate.tasks, *evaluate.diagnostics]):
        if task.startswith("heldout:"):
            total += evaluate.heldout_tokens
            continue
        limit = evaluate.limit or 1000
        path = Path(evaluate.data_dir or "") / f"{task}.jsonl"
        if evaluate.data_dir and path.is_file():
            with path.open("rb") as lines:
                read = sum(len(line) for _, line in zip(range(limit), lines, strict=False))
            total += int(read / BYTES_PER_TOKEN)
        else:
            total += limit * ASSUMED_TOKENS_PER_DOCUMENT
    return total


def _training_bytes(shape: ModelShape, config: RunConfig, device: Accelerator, gpu: bool) -> int:
    """Peak memory of one training process (demix.memory_plans.training_plan), bfloat16 on a
    GPU and float32 on a CPU."""
    where = (device.name, gpu, int(device.memory_bytes))
    return training_plan(shape, config.train, config.model.attn_implementation, device=where).needed


def plan_run(config: RunConfig, device: Accelerator, eval_workers: int = 2) -> list[StagePlan]:
    """The rows of the plan of `config` on `device`, in the order the stages run; the tasks
    of each as the pipeline runs them with `eval_workers` evaluation shards per round."""
    from demix.merge.plan import memory_plan

    gpu = not device.name.startswith("this machine")
    shape = base_shape(config)
    train_rate = device.peak_flops * device.train_utilisation
    eval_rate = device.peak_flops * device.eval_utilisation
    per_token = flops_per_token(shape, config.train.seq_len, training=True)
    eval_per_token = flops_per_token(shape, config.train.seq_len, training=False)
    model_bytes = 4 * shape.parameters
    k = len(config.data.datasets)
    rows = []

    input_bytes, files, why = _input_bytes(config)
    groups = max(1, min(config.data.curate_groups, files))
    curate = StagePlan("curate", groups + 3, gpu=False)  # plan, groups, reduce, names
    if input_bytes is None:
        curate.notes.append(f"inputs not listed, their size unknown: {why}")
    else:
        tokens = int(input_bytes / BYTES_PER_TOKEN)
        cap = config.data.max_tokens
        if cap is not None:  # one number or one per dataset: at most that many per dataset
            per = cap.values() if isinstance(cap, dict) else [cap] * len(config.data.datasets)
            tokens = min(tokens, sum(per))
        curate.tokens = tokens
        curate.seconds = input_bytes / CURATE_BYTES_PER_S
        curate.written_bytes = curate.tokens * (2 if shape.vocab <= 1 << 16 else 4)
    rows.append(curate)

    def training(stage: str, tasks: int, tokens: int) -> StagePlan:
        flops = per_token * tokens
        return StagePlan(
            stage,
            tasks,
            tokens=tokens,
            flops=flops,
            seconds=flops / train_rate,
            peak_bytes=_training_bytes(shape, config, device, gpu),
            written_bytes=tasks * model_bytes * 4,  # the model, and its checkpoint (x3)
        )

    if config.model.base is None:
        rows.append(training("base", 1, config.train.base.tokens))
    else:
        rows.append(StagePlan("base", 1, written_bytes=model_bytes, notes=["given: verified"]))
    components = training("components", k, k * config.train.component.tokens)
    components.tasks += 1  # the model index
    rows.append(components)

    proxies = sum(config.search.round_sizes)
    eval_tokens = _eval_tokens(config)
    merge = memory_plan(shape.parameters, "float32", k, config.merge.method, device="cpu")
    build = 2 * model_bytes * (k + 1) / device.copy_bytes_per_s if gpu else merge.seconds_per_build
    search = StagePlan(
        "search",
        config.search.rounds * (eval_workers + 1) + 1,  # shards and a fit per round; selection
        proxies=proxies,
        flops=proxies * eval_tokens * eval_per_token,
        peak_bytes=merge.device_bytes,
    )
    search.seconds = proxies * build + search.flops / eval_rate
    if config.search.method == "trained":
        trained = training("search", proxies, proxies * config.train.component.tokens)
        search.tokens, search.flops = trained.tokens, search.flops + trained.flops
        search.seconds += trained.seconds
        search.written_bytes = trained.written_bytes
    rows.append(search)

    runs = len(FINAL_LABELS) * config.final.seeds
    final = training("finals", runs, runs * config.train.final.tokens)
    final.tasks += 4  # export, merge the chosen mixture, list the runs, evaluate
    final_eval = runs * eval_tokens * eval_per_token
    final.flops += final_eval
    final.seconds += final_eval / eval_rate
    rows.append(final)
    return rows


def plan_table(config: RunConfig, device: Accelerator, eval_workers: int = 2) -> dict:
    """The plan as a JSON-ready dict: rows, totals and the assumptions behind them."""
    rows = plan_run(config, device, eval_workers)
    shape = base_shape(config)
    gpu_seconds = sum(r.seconds for r in rows if r.gpu)
    return {
        "accelerator": asdict(device),
        "model": asdict(shape),
        "stages": [asdict(r) for r in rows],
        "total": {
            "tokens": sum(r.tokens for r in rows if r.stage != "curate"),
            "flops": sum(r.flops for r in rows),
            "seconds": sum(r.seconds for r in rows),
            "gpu_hours": gpu_seconds / 3600,
            "written_bytes": sum(r.written_bytes for r in rows),
            "tasks": sum(r.tasks for r in rows) + 2,  # read inputs, resolve config
        },
        "reuse": (
            "a rerun with the same data, base and training settings reuses the curation, the "
            "base and every component (content-keyed, <pipeline root>/demix-jobs/); a changed "
            "candidate dataset retrains its component only; search and evaluate settings rerun "
            "the search and the finals"
        ),
    }


def _si(value: float, unit: str = "") -> str:
    """1.2k, 3.4M, 5.6G, ... (0 as a dash)."""
    if not value:
        return "-"
    for scale, prefix in (
        (1e18, "E"),
        (1e15, "P"),
        (1e12, "T"),
        (1e9, "G"),
        (1e6, "M"),
        (1e3, "k"),
    ):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{prefix}{unit}"
    return f"{value:.3g}{unit}"


def _duration(seconds: float) -> str:
    if not seconds:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def format_plan(table: dict) -> str:
    """The plan as a text table with its assumptions, as `demix plan` prints it."""
    device, model = table["accelerator"], table["model"]
    header = ["stage", "tasks", "tokens", "FLOPs", "proxies", "time", "peak memory", "written"]
    lines = [
        [
            r["stage"],
            str(r["tasks"]),
            _si(r["tokens"]),
            _si(r["flops"]),
            str(r["proxies"] or "-"),
            _duration(r["seconds"]),
            _si(r["peak_bytes"], "B"),
            _si(r["written_bytes"], "B"),
        ]
        for r in table["stages"]
    ]
    total = table["total"]
    lines.append(
        [
            "total",
            str(total["tasks"]),
            _si(total["tokens"]),
            _si(total["flops"]),
            "",
            _duration(total["seconds"]),
            "",
            _si(total["written_bytes"], "B"),
        ]
    )
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    text = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *lines]
    ]
    notes = [f"  {r['stage']}: {n}" for r in table["stages"] for n in r["notes"]]
    gpu_name = "GPU" if "this machine" not in device["name"] else "device"
    return (
        "\n".join(
            [
                f"plan on {device['name']}: {_si(device['peak_flops'], 'FLOP/s')} peak, training at "
                f"{device['train_utilisation']:.0%} and evaluation at {device['eval_utilisation']:.0%} "
                f"of it ({device['source']})",
                f"model: {_si(model['parameters'])} parameters, {model['layers']} layers, hidden "
                f"{model['hidden']}, vocabulary {model['vocab']} (from {model['source']})",
                "",
                *text,
                *notes,
                "",
                f"{gpu_name} time: {total['gpu_hours']:.3f} hours of work ({_duration(total['seconds'])} "
                "with curation); a pipeline runs a loop's tasks side by side",
                f"curation: {CURATE_BYTES_PER_S / 1e6:.1f} MB of input per second and "
                f"{BYTES_PER_TOKEN} bytes per token (measured on the demo); written: models, "
                "checkpoints and the dataset in the bucket",
                f"rerun: {table['reuse']}",
            ]
        )
        + "\n"
    )
