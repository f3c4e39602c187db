"""`demix` command: one subcommand per stage, and `run` for a local end-to-end run.

Bad input prints one line `demix: error: ...` and exits with code 2; anything else is a bug:
one line `demix: internal error: ...` and exit code 3, with the traceback under --debug.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from demix.cli_outputs import (
    check_config,
    config_limits,
    curate_out,
    dataset_arg,
    demo_out,
    evaluate_out,
    export_out,
    local_folder,
    merge_out,
    model_arg,
    recipe_out,
    run_arg,
    run_config,
    scaling_out,
    search_limits,
    search_out,
    train_limits,
    train_out,
    validate_out,
    writes,
)
from demix.cli_outputs import parse_overrides as parse_overrides
from demix.cli_parser import build_parser as build_parser  # tests, docs  # `--set`: tests, callers
from demix.errors import ConfigError, DemixError, report_error
from demix.logs import configure_logging
from demix.storage.outputs import DECISION_KIND, REPRODUCE_KIND, RUN_KIND


def parse_mixture(text: str) -> dict[str, float]:
    """--mixture's value as {dataset: weight} (demix.mixtures.parse_mixture, imported on use:
    numpy is not needed to parse the command line).

    Raises MixtureError naming the entry (or file) for text that is no mixture.
    """
    from demix.mixtures import parse_mixture as parse

    return parse(text)


@writes(lambda args: demo_out(args.out))
def _cmd_fetch_demo(args) -> None:
    from demix.data.demo import fetch_demo

    fetch_demo(Path(args.out), force=args.force)
    print(f"demo data ready in {args.out}")


@writes(curate_out, reads=("config",))
def _cmd_curate(args) -> None:
    from demix.stages import curate_stage
    from demix.storage import artifact_output

    config = run_config(args)
    with artifact_output(args.out) as out:
        data = curate_stage(config, out)
    shown = {"datasets": data.names, "token_prior": data.token_prior}
    print(json.dumps({**shown, "targets": data.targets} if data.targets else shown, indent=2))


@writes(train_out, reads=("data", "init"), limits=train_limits)
def _cmd_train(args) -> None:
    from demix.distributed import cluster_from_env, launched, run_launched
    from demix.stages.worker import train_process
    from demix.storage import is_remote

    config = run_config(args)
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
    names = {
        "base": "base",
        "component": args.dataset,
        "control": "control",
        "final": args.name or "final",
    }
    name = names.get(args.role)  # None: a reference is named by its folder
    train_process(
        config, args.role, args.out, name, args.data, args.init, mixture, args.publish_uri
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"model written to {args.out}")


@writes(merge_out, reads=("data", "base", "components"))
def _cmd_merge(args) -> None:
    from demix.stages import merge_stage
    from demix.storage import artifact_output

    mixture = parse_mixture(args.mixture)
    run = run_arg(args)
    with artifact_output(args.out) as out:
        manifest = merge_stage(run, mixture, out)
    print(
        json.dumps(
            {k: manifest[k] for k in ("data_mixture", "component_weights", "relative_delta_norms")}
        )
    )


@writes(evaluate_out, reads=("data", "models"))
def _cmd_evaluate(args) -> None:
    from demix.model import resolve_device
    from demix.proxies import make_evaluator
    from demix.stages import evaluate_models_stage
    from demix.storage import check_uri, write_output_bytes

    config = run_config(args)
    if args.out:
        check_uri(args.out)
    data = dataset_arg(args.data)
    # The tasks first: an unknown task or an empty eval set fails before any model is fetched.
    evaluator = make_evaluator(config.evaluate, data, resolve_device(config.train.device))
    models = {Path(m).name: model_arg(m) for m in args.models}
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


@writes(search_out, reads=("data", "base", "components"), limits=search_limits)
def _cmd_search(args) -> None:
    from demix.stages import search_stage
    from demix.storage import synced_folder

    run = run_arg(args)
    with synced_folder(args.out) as out:
        result = search_stage(run, out)
    print(
        json.dumps({"mixture": result["mixture"], "proxies_evaluated": result["proxies_evaluated"]})
    )


@writes(validate_out, reads=("data", "base", "components"))
def _cmd_validate(args) -> None:
    from demix.fidelity import AGGREGATE
    from demix.stages.validate import validate_stage

    result = validate_stage(run_arg(args), Path(args.out))
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


@writes(recipe_out(REPRODUCE_KIND), limits=config_limits())
def _cmd_reproduce(args) -> None:
    from demix.recipes.reproduce import reproduce

    reproduce(run_config(args), Path(args.out))
    print((Path(args.out) / "reproduce.md").read_text())
    print(f"wrote {Path(args.out) / 'reproduce.json'} and {Path(args.out) / 'reproduce.md'}")


@writes(recipe_out(DECISION_KIND), limits=config_limits(decision=True))
def _cmd_reproduce_decision(args) -> None:
    from demix.recipes.decision import reproduce_decision

    reproduce_decision(run_config(args), Path(args.out))
    print((Path(args.out) / "decision.md").read_text())
    print(f"wrote {Path(args.out) / 'decision.json'} and {Path(args.out) / 'decision.md'}")


@writes(recipe_out(RUN_KIND), limits=config_limits())
def _cmd_run(args) -> None:
    from demix.base_model import check_base_reachable
    from demix.recipes.run import run
    from demix.report import print_summary

    config = run_config(args)
    check_base_reachable(config.model.base)  # before the run folder is written
    out = local_folder(args.out)
    summary = run(config, out)
    print_summary(summary, out)


def _cmd_report(args) -> None:
    from demix.stages import report_stage

    print(report_stage(local_folder(args.run)))


@writes(scaling_out, reads=("folders",))
def _cmd_scaling(args) -> None:
    from demix.report.scaling import scaling_table
    from demix.storage import write_output_bytes

    table = scaling_table([Path(folder) for folder in args.folders])
    print(table, end="")
    if args.out:
        write_output_bytes(args.out, table.encode())


@writes(export_out, reads=("run",))
def _cmd_export(args) -> None:
    from demix.export import file_text, parse_prefixes, read_run, render
    from demix.storage import write_output_bytes

    export = read_run(local_folder(args.run))
    text = render(export, args.format, parse_prefixes(args.prefix, export["datasets"]))
    if args.out:
        write_output_bytes(args.out, file_text(text, args.format).encode())
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)


def _cmd_validate_config(args) -> None:
    print(check_config(args))  # the summary and the memory plans; a plan that does not fit: exit 2


def _cmd_plan(args) -> None:
    from demix.stages.plan import accelerator, format_plan, plan_table

    if args.eval_workers < 1:
        raise DemixError(f"--eval-workers {args.eval_workers}: give 1 or more")
    table = plan_table(run_config(args), accelerator(args.accelerator), args.eval_workers)
    sys.stdout.write(json.dumps(table, indent=2) + "\n" if args.json else format_plan(table))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `demix` console script; returns the exit code (see demix.errors)."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # rerun under accelerate launch
    configure_logging(args.verbose)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        globals()[f"_cmd_{args.handler}"](args)  # looked up now: patchable in tests
    except KeyboardInterrupt as err:
        print(f"demix: {err or 'interrupted'}; rerun the same command to resume", file=sys.stderr)
        return 143 if str(err) == "terminated" else 130
    except Exception as err:  # noqa: BLE001 (the one boundary: every error becomes one line)
        return report_error(err, debug=args.debug)
    return 0


if __name__ == "__main__":
    sys.exit(main())
