"""The pipeline's sub-graphs: curation, the models, the search and the finals, each a
`@dsl.pipeline` function that pipeline.py composes into the public pipeline (the KFP UI and
Vertex AI show each as one node that opens onto its tasks).

Built per Placement (the search rounds are unrolled at compile time, every task placed by it).
Every sub-graph takes at least one parameter beside its artifacts: kfp.local 2.17.3 drops the
artifact inputs of a nested pipeline task that has no parameter input (it looks them up among
the enclosing pipeline's own inputs instead), so a sub-graph of artifacts alone fails locally.
No `from __future__ import annotations` here: KFP reads the annotations as types.
"""

from dataclasses import dataclass
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model
from kfp.dsl.base_component import BaseComponent

from components.collect_models import collect_models
from components.curate_data import curate_data
from components.curate_group import curate_group
from components.dataset_names import dataset_names
from components.evaluate_final import evaluate_final
from components.evaluate_proxies import evaluate_proxies
from components.merge import merge
from components.plan_curation import plan_curation
from components.predict import predict
from components.train_final import train_final
from components.train_model import train_model
from deploy.placement import Placement, on_cpu, on_eval_gpu, on_training_gpus, training_inputs


class Models(NamedTuple):
    """The models sub-graph's outputs: the base, and the components' index ({name: URI})."""

    base: Model
    index: Artifact


class Finals(NamedTuple):
    """The finals sub-graph's outputs: the verdict, the report and the verdict's numbers."""

    verdict: Markdown
    report: HTML
    metrics: Metrics


@dataclass(frozen=True)
class Graphs:
    """The sub-graphs of one placement, in the order the pipeline runs them."""

    curate: BaseComponent
    models: BaseComponent
    search: BaseComponent
    finals: BaseComponent


def build_graphs(placement: Placement) -> Graphs:
    """The sub-graphs for one placement."""
    # Training tasks reuse models an earlier run trained for the same job (by content).
    training = {**training_inputs(placement), "jobs_root": dsl.PIPELINE_ROOT_PLACEHOLDER}

    @dsl.pipeline(name="curate", description="Curation: plan, one task per group, merge.")
    def curate(config: Input[Artifact], data_fingerprint: str) -> Dataset:
        """Plan the curation (files, groups, tokenizer), curate each group, merge the groups.

        Args:
            config: The resolved run config.
            data_fingerprint: The candidate data's fingerprint (read inputs): in the cache key.
        """
        plan = on_cpu(plan_curation(config=config, data_fingerprint=data_fingerprint), placement)
        plan.set_display_name("curate / plan")
        with dsl.ParallelFor(
            plan.outputs["Output"], name="curate / groups", parallelism=placement.cpu_parallelism
        ) as group:
            part = on_cpu(curate_group(plan=plan.outputs["plan"], group=group), placement)
            part.set_display_name("curate group")
        data = on_cpu(
            curate_data(
                plan=plan.outputs["plan"],
                parts=dsl.Collected(part.outputs["part"]),
                data_fingerprint=data_fingerprint,
            ),
            placement,
        ).set_display_name("curate / merge groups")
        return data.outputs["dataset"]

    @dsl.pipeline(name="models", description="The base and one component per dataset.")
    def models(config: Input[Artifact], data: Input[Dataset], base_fingerprint: str) -> Models:
        """Train (or fetch) the base, then one component per candidate dataset from it.

        Args:
            config: The resolved run config.
            data: The curated dataset.
            base_fingerprint: model.base's content fingerprint (read inputs): in the cache key.
        """
        base = on_training_gpus(
            train_model(
                config=config,
                role="base",
                name="base",
                data=data,
                base_fingerprint=base_fingerprint,
                **training,
            ),
            placement,
        ).set_display_name("train base")
        names = on_cpu(dataset_names(config=config), placement)
        names.set_display_name("list components")
        with dsl.ParallelFor(
            names.output, name="train components", parallelism=placement.parallelism
        ) as name:
            component = on_training_gpus(
                train_model(
                    config=config,
                    role="component",
                    name=name,
                    data=data,
                    init=base.outputs["model"],
                    **training,
                ),
                placement,
            ).set_display_name("train component")
        # The index (names and URIs, no weights): later tasks fetch each model by its URI.
        index = on_cpu(
            collect_models(entries=dsl.Collected(component.outputs["Output"])), placement
        ).set_display_name("index components")
        return Models(base=base.outputs["model"], index=index.outputs["index"])

    @dsl.pipeline(name="search", description="Rounds of proxies, scored, then the choice.")
    def search(
        config: Input[Artifact],
        data: Input[Dataset],
        base: Input[Model],
        component_index: Input[Artifact],
        num_eval_workers: int,
    ) -> Artifact:
        """Propose mixtures, evaluate their merged proxies in shards, fit, propose again; the
        last step selects the mixture. Rounds are numbered from 0, as in the search history.

        Args:
            config: The resolved run config.
            data: The curated dataset.
            base: The base model.
            component_index: The components' index ({name: URI}).
            num_eval_workers: Evaluation tasks (shards) per round.
        """
        step = on_cpu(
            predict(config=config, data=data, round_index=0, num_shards=num_eval_workers),
            placement,
        ).set_display_name("round 0 / propose")
        for r in range(1, placement.rounds + 1):
            with dsl.ParallelFor(
                step.outputs["Output"],
                name=f"round {r - 1} / proxies",
                parallelism=placement.parallelism,
            ) as shard:
                scored = on_eval_gpu(
                    evaluate_proxies(
                        config=config,
                        data=data,
                        base=base,
                        component_index=component_index,
                        proposals=step.outputs["result"],
                        shard=shard,
                        num_shards=num_eval_workers,
                    ),
                    placement,
                ).set_display_name(f"round {r - 1} / evaluate proxies")
            step = on_cpu(
                predict(
                    config=config,
                    data=data,
                    round_index=r if r < placement.rounds else -1,
                    num_shards=num_eval_workers,
                    history=step.outputs["history_out"],
                    scores=dsl.Collected(scored.outputs["scores"]),
                ),
                placement,
            ).set_display_name(f"round {r} / propose" if r < placement.rounds else "select mixture")
        return step.outputs["result"]

    @dsl.pipeline(name="finals", description="Final models on the chosen mixture and baselines.")
    def finals(
        config: Input[Artifact],
        data: Input[Dataset],
        base: Input[Model],
        component_index: Input[Artifact],
        selection: Input[Artifact],
        runs: list,
    ) -> Finals:
        """Merge the chosen mixture, train each final run from the base, evaluate the finals.

        Args:
            config: The resolved run config.
            data: The curated dataset.
            base: The base model.
            component_index: The components' index ({name: URI}).
            selection: The search's selection (the chosen mixture).
            runs: The final runs' names (list final runs): each label for each final seed.
        """
        on_cpu(
            merge(
                config=config,
                data=data,
                base=base,
                component_index=component_index,
                selection=selection,
            ),
            placement,
            holds_models=True,
        ).set_display_name("merge chosen mixture")
        with dsl.ParallelFor(runs, name="train finals", parallelism=placement.parallelism) as run:
            final = on_training_gpus(
                train_final(
                    config=config,
                    label=run,
                    data=data,
                    base=base,
                    selection=selection,
                    **training,
                ),
                placement,
            ).set_display_name("train final")
        judged = on_eval_gpu(
            evaluate_final(  # the components' norms from their manifests: no weights
                config=config,
                data=data,
                base=base,
                component_index=component_index,
                finals=dsl.Collected(final.outputs["model"]),
                selection=selection,
            ),
            placement,
        ).set_display_name("evaluate finals")
        return Finals(
            verdict=judged.outputs["verdict"],
            report=judged.outputs["report"],
            metrics=judged.outputs["metrics"],
        )

    return Graphs(curate=curate, models=models, search=search, finals=finals)
