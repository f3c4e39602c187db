"""The DeMix stages: one function per stage, over artifact folders.

Each stage reads its inputs (curated dataset, model folders, JSON tables), writes one artifact
folder or file (manifest last) and returns what it made. The recipes (`demix run`, validate,
reproduce) and the KFP components call these same functions, so a stage behaves the same in a
local run and in a pipeline task; neither adds logic of its own.

    curate      curate_stage | plan_curation_stage -> curate_group_stage -> merge_curation_stage
    train       train_stage (base, component, reference, final; 1 or N processes)
    search      search_stage (the loop) | propose/select in predict_stage
    proxies     the proxy evaluators (merged, trained), make_proxy, evaluate_proxies_stage (a
                round's proxies), merge_stage (on disk)
    memory      a run config's memory plans (training, the search pool), checked first
    finals      evaluate_models_stage, evaluate_finals_stage (scores, summary.json, report),
                report_stage (a finished run's report drawn again)
    artifacts   the base's folder, the model index and the component manifests
    run         what the recipes share: the run folder, prepared models, finals, the evaluator
    values      Run: the config, the curated data, the base and the components, in one value
    validate    validate_stage: trained references against merged proxies (demix.stages.validate,
                imported from there: it trains and evaluates, so it loads on first use)
    reproduce   the fidelity protocol's stages (one seed, sweep, ladder, ablations, the table)
    decision    the decision protocol's stages (each budget's searches and fits, finals, table)
    launch      a training job in several processes; worker: each process's entry point

The names below are those the recipes, components and tests import from `demix.stages`.
"""

from demix.stages.artifacts import (
    base_model_dir,
    index_entry,
    models_by_name,
    read_component_manifests,
    read_model_index,
    write_index_entries,
    write_model_index,
)
from demix.stages.curate import (
    curate_group_stage,
    curate_stage,
    curation_fingerprint,
    fetch_configured_demo,
    merge_curation_stage,
    plan_curation_stage,
)
from demix.stages.finals import (
    evaluate_each,
    evaluate_finals_stage,
    evaluate_models_stage,
    finals_by_label,
    judge_finals,
    report_stage,
)
from demix.stages.proxies import evaluate_proxies_stage, make_proxy, merge_stage
from demix.stages.run import (
    add_wall_times,
    component_manifests,
    final_mixtures,
    prepare_models,
    run_evaluator,
    start_run_folder,
    train_finals,
)
from demix.stages.search import (
    describe_selection,
    predict_stage,
    propose_stage,
    search_stage,
    select_stage,
)
from demix.stages.train import train_components, train_stage
from demix.stages.values import Run

__all__ = [
    "Run",
    "add_wall_times",
    "component_manifests",
    "final_mixtures",
    "prepare_models",
    "run_evaluator",
    "start_run_folder",
    "train_finals",
    "base_model_dir",
    "curate_group_stage",
    "curate_stage",
    "curation_fingerprint",
    "describe_selection",
    "evaluate_each",
    "evaluate_finals_stage",
    "evaluate_models_stage",
    "evaluate_proxies_stage",
    "fetch_configured_demo",
    "finals_by_label",
    "index_entry",
    "judge_finals",
    "make_proxy",
    "merge_curation_stage",
    "merge_stage",
    "models_by_name",
    "plan_curation_stage",
    "predict_stage",
    "propose_stage",
    "read_component_manifests",
    "read_model_index",
    "report_stage",
    "search_stage",
    "select_stage",
    "train_components",
    "train_stage",
    "write_index_entries",
    "write_model_index",
]
