"""What the `demix` commands share besides the parser: the run config of `--config` and `--set`,
the model, dataset and component arguments (local or gs://), and the outputs each command writes, checked before any work and cleaned after a failure (the
output rule of demix.storage.outputs)."""

from __future__ import annotations

import contextlib
import functools
import json
import signal
from collections.abc import Iterator
from pathlib import Path

from demix.errors import ConfigError, DemixError, process_rank
from demix.storage.inputs import check_not_inputs
from demix.storage.outputs import (
    SEARCH_KIND,
    VALIDATE_KIND,
    Output,
    check_output,
    guarded_outputs,
)


def run_config(args):
    from demix.config import load_config

    if getattr(args, "loaded_config", None) is None:  # loaded once: outputs, then the command
        args.loaded_config = load_config(args.config, parse_overrides(args.set))
    return args.loaded_config


def add_set_argument(parser, help_: str = "") -> None:
    """`--set KEY=VALUE` (repeatable) on a parser that takes a run config: one definition for
    `demix`, `pipeline.py run-local`, `submit` and `schedule` (read by parse_overrides)."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=help_ or "override a config key, e.g. --set merge.method=ties (repeatable)",
    )


def parse_overrides(items: list[str]) -> dict[str, object]:
    """`--set key.path=value` items as {key.path: value}, values read as YAML.

    Raises ConfigError naming the item without a key or whose value is not valid YAML.
    """
    from demix.config import load_yaml

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. merge.method=ties")
        if not key.strip().isprintable() or len(key.split()) > 1:
            raise ConfigError(
                f"--set {item!r}: {key.strip()!r} is not a key path; write KEY=VALUE with a "
                "dotted key, e.g. merge.method=ties"
            )
        overrides[key.strip()] = load_yaml(value, f"--set {item!r}")
    return overrides


def local_folder(uri: str) -> Path:
    """A folder argument that must be local (a /gcs/ mount path is local)."""
    from demix.storage import check_uri, is_remote

    check_uri(uri)
    if is_remote(uri):
        raise DemixError(
            f"{uri}: this command writes a local run folder; give a local or /gcs/... path, "
            "or run the stages one by one with gs:// URIs"
        )
    return Path(uri)


def writes(outputs, reads: tuple[str, ...] = (), limits=None):
    """Run a command under the output rule of demix.storage.outputs for the paths `outputs(args)`.

    `limits(args)` runs first: the memory plans a command can check before it touches an
    output (demix.memory_plans), so a refused plan leaves nothing behind. The outputs are then
    locked (one writer per output; `--wait-lock` waits for another command's lock) and checked
    before any work: a path holding what demix did not write, or equal to, inside or holding a
    path the command reads (`reads`: the arguments holding them, NAME=PATH values too;
    "config": the config's dataset paths and base), is refused. What the command created there
    is removed again when it fails, however it fails (SIGTERM included).
    """

    def wrap(command):
        @functools.wraps(command)
        def guarded(args) -> None:
            from demix.data.demo import DEMO_KIND

            if limits is not None:
                limits(args)
            found = outputs(args)
            for output in found:
                check_output(output)  # what is at an output is named first
            # the demo folder a config fetches into holds the inputs it then reads: not checked
            check_not_inputs([o for o in found if o.kind != DEMO_KIND], read_paths(args, reads))
            with (
                terminated_as_interrupt(),  # SIGTERM: cleanup runs as for Ctrl-C
                guarded_outputs(*found, wait_lock=getattr(args, "wait_lock", False)),
            ):
                command(args)

        return guarded

    return wrap


def read_paths(args, reads: tuple[str, ...]) -> list[str]:
    """The paths a command reads: the values of the arguments `reads` ("config": the config's
    dataset and target paths and its local or gs:// base)."""
    paths: list[str | None] = []
    for name in reads:
        if name == "config":
            config = run_config(args)
            paths += [p for spec in config.data.all_specs for p in spec.paths]
            paths.append(config.model.base if config.model.base_form in ("local", "gcs") else None)
            continue
        value = getattr(args, name, None)
        for item in value if isinstance(value, list) else [value]:
            paths.append(item.partition("=")[2] if item and name == "components" else item)
    return [str(p) for p in paths if p]


def config_limits(decision: bool = False):
    """run / reproduce: every memory plan of the config (training of its base when it is built
    or local, the search pool, the decision's pool with `decision`) checked before any output.
    """

    def check(args) -> None:
        from demix.memory_plans import check_plans
        from demix.stages.memory import config_plans

        check_plans(config_plans(run_config(args), decision))

    return check


def search_limits(args) -> None:
    """search: the candidate pool's memory plan, checked before the search folder is made."""
    from demix.stages.memory import config_search_plan

    config_search_plan(run_config(args)).check()


def train_limits(args) -> None:
    """train: the memory plan of the model trained (a local --init folder's shape, else the
    config's architecture with a local dataset's vocabulary), checked before any output. A
    gs:// input, and training in several processes, are planned by the training loop of each
    process (a CUDA context made here, in the process that launches them, would take memory
    from the first GPU for the whole run)."""
    from demix.distributed import cluster_from_env, launched
    from demix.memory_plans import shape_of_architecture, shape_of_folder, training_plan
    from demix.storage import is_remote

    config = run_config(args)
    if launched() or args.processes != 1 or cluster_from_env() is not None:
        return
    if args.init:
        if is_remote(args.init) or not Path(args.init, "config.json").is_file():
            return  # fetched first (or refused with its own error): the loop plans it
        shape = shape_of_folder(args.init)
    elif args.role == "base" and not config.model.base:
        vocab = _local_vocab(args.data) or config.data.tokenizer.vocab_size
        shape = shape_of_architecture(config.model.architecture, vocab)
    else:
        return
    training_plan(shape, config.train, config.model.attn_implementation).check()


def _local_vocab(uri: str) -> int | None:
    """The vocab_size in a local dataset's manifest (None: remote, or not readable yet: the
    dataset is verified, and refused if need be, when it is read)."""
    try:
        value = json.loads(Path(uri, "manifest.json").read_text())["vocab_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def check_config(args) -> str:
    """check-config's report: the config's summary and its memory plans, one line each.

    Raises ConfigError for a config that does not validate or a plan above the memory this
    machine has (demix.memory_plans).
    """
    from demix.base_model import check_base_reachable
    from demix.memory_plans import check_plans
    from demix.stages.memory import config_plans

    config = run_config(args)
    check_base_reachable(config.model.base)  # a hub id needs the hub where it runs
    plans = check_plans(config_plans(config, decision=True))
    summary = f"{len(config.data.datasets)} datasets, {len(config.evaluate.tasks)} tasks"
    unplanned = []
    if not any(p.what == "training" for p in plans):
        unplanned = ["training memory plan: made when the base is fetched and verified"]
    return "\n".join([f"{args.config}: valid ({summary})", *(p.line for p in plans), *unplanned])


def demo_out(out: str | None) -> list:
    """The demo data folder `out` (fetch-demo --out, a config's data.fetch_demo) as an output."""
    from demix.data.demo import DEMO_KIND

    return [Output(out, DEMO_KIND)] if out else []


def curate_out(args) -> list:
    """curate: the dataset artifact and the demo folder its config fetches into."""
    from demix.data.shards import DATASET_KIND

    return [Output(args.out, DATASET_KIND), *demo_out(run_config(args).data.fetch_demo)]


def train_out(args) -> list:
    """train: the model artifact and the checkpoint folder `<out>.ckpt` training keeps beside it."""
    from demix.checkpoint import MODEL_KIND
    from demix.train import CHECKPOINT_KIND

    ckpt = f"{str(args.out).rstrip('/')}.ckpt"  # train_model's and checkpoint_sync's name for it
    outputs = [Output(args.out, MODEL_KIND), Output(ckpt, CHECKPOINT_KIND)]
    if args.publish_uri and main_training_process():  # the others never write to the bucket
        outputs.append(Output(f"{args.publish_uri.rstrip('/')}.ckpt", CHECKPOINT_KIND))
    return outputs


def main_training_process() -> bool:
    """Whether this is the main training process: rank 0 of a launch, or (before one) the
    process of this machine when it is the first of a Vertex AI cluster or alone."""
    from demix.distributed import cluster_from_env

    if process_rank() != 0:
        return False
    cluster = cluster_from_env()
    return cluster is None or cluster.rank == 0


def merge_out(args) -> list:
    """merge: the merged model artifact."""
    from demix.checkpoint import MODEL_KIND

    return [Output(args.out, MODEL_KIND)]


def is_evaluation(data: bytes) -> bool:
    """Whether a file holds what `demix evaluate --out` writes: {model: {ranking_score, ...}}."""
    try:
        found = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False
    return (
        isinstance(found, dict)
        and bool(found)
        and all(
            isinstance(v, dict) and {"ranking_score", "categories"} <= set(v)
            for v in found.values()
        )
    )


def evaluate_out(args) -> list:
    """evaluate: the optional JSON file --out, replaced only when it holds an earlier result."""
    return [Output(args.out, "demix.evaluation", "file", is_evaluation)] if args.out else []


def search_out(args) -> list:
    """search: the search folder (local or gs://) it writes scores.jsonl and result.json into."""
    return [Output(args.out, SEARCH_KIND, "folder")]


def validate_out(args) -> list:
    """validate: the local folder for fidelity.json, fidelity.html and references/."""
    return [Output(local_folder(args.out), VALIDATE_KIND, "folder")]


def recipe_out(kind: str):
    """run / reproduce: the local run folder, and the demo folder the config fetches into."""

    def outputs(args) -> list:
        folder = Output(local_folder(args.out), kind, "folder")
        return [folder, *demo_out(run_config(args).data.fetch_demo)]

    return outputs


def scaling_out(args) -> list:
    """scaling: the optional file --out, replaced only when it holds an earlier scaling table."""
    from demix.report.scaling import SCALING_KIND, is_scaling_table

    return [Output(args.out, SCALING_KIND, "file", is_scaling_table)] if args.out else []


def export_out(args) -> list:
    """export: the optional file --out, replaced only when it holds an earlier export."""
    from demix.export import EXPORT_KIND, is_export

    return [Output(args.out, EXPORT_KIND, "file", is_export)] if args.out else []


def components_arg(values: list[str]) -> dict[str, Path]:
    """--components NAME=PATH entries as {name: local verified folder} (gs:// fetched)."""
    out = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            raise DemixError(f"--components entry {value!r}: expected NAME=PATH")
        out[name] = model_arg(path)
    return out


def run_arg(args):
    """The Run of a command that takes --data, --base and --components: the config (with
    --set), the curated dataset, the base and the components, each fetched and verified."""
    from demix.stages.values import Run

    return Run(
        run_config(args),
        dataset_arg(args.data),
        model_arg(args.base),
        components_arg(args.components),
    )


def dataset_arg(uri: str):
    """The curated dataset at a local path or gs:// URI, every file checked against its manifest."""
    from demix.data.shards import DATASET_KIND, CuratedData
    from demix.storage import fetch_artifact

    return CuratedData(fetch_artifact(uri, DATASET_KIND))


def model_arg(uri: str) -> Path:
    """A model folder at a local path or gs:// URI; a demix manifest, when present, is verified
    (a plain Hugging Face folder in a bucket is fetched as a base: demix.base_model)."""
    from demix.base_model import model_folder

    return model_folder(uri)


def add_wait_lock(sub) -> None:
    """Give every subcommand that writes an --out the flag --wait-lock."""
    for parser in sub.choices.values():
        if any("--out" in action.option_strings for action in parser._actions):
            parser.add_argument(
                "--wait-lock",
                action="store_true",
                help="when another demix command writes the same output, wait for it to finish "
                "instead of refusing",
            )


@contextlib.contextmanager
def terminated_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises KeyboardInterrupt("terminated"), so a terminated command
    cleans up what it created as an interrupted one does (the main thread only)."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt("terminated")

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: the default action stays
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
