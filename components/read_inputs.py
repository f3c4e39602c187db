from typing import NamedTuple

from kfp import dsl

from components.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def read_inputs(config_yaml: str, config_uri: str, pipeline_root: str) -> NamedTuple(
    "RunInputs", config_text=str, data_fingerprint=str, base_fingerprint=str
):
    """The run's first task, never cached: the config's text (inline, or read from config_uri)
    and the fingerprints of its data and base model, from listings (gs://: generations and
    crc32c, nothing downloaded). They enter the later tasks' cache keys, so a run started from
    the UI, the console, `submit` or a schedule has the same keys for the same inputs. Refuses
    a pipeline root DeMix cannot read (Kubeflow's default minio://) before anything runs."""
    from collections import namedtuple

    from demix.logs import configure_logging
    from demix.run_inputs import check_pipeline_root, read_run_inputs

    configure_logging()
    check_pipeline_root(pipeline_root)
    found = read_run_inputs(config_yaml, config_uri)
    outputs = namedtuple("RunInputs", ["config_text", "data_fingerprint", "base_fingerprint"])
    return outputs(found.config_text, found.data_fingerprint, found.base_fingerprint)
