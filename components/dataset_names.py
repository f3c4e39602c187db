from kfp import dsl

from components.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def dataset_names(config_yaml: str) -> list[str]:
    """The candidate dataset names, to fan component training out over."""
    from demix.config import resolve_config

    return [d.name for d in resolve_config(config_yaml).data.datasets]
