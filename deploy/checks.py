"""Compile settings checked before anything is written: Kubernetes quantities, accelerator names
of each target, GPU node selectors and tolerations, and images a cluster can pull.

Each check raises ConfigError with one line naming the flag, the value and what to give
instead; pipeline.py prints it as `pipeline.py: error: ...` and exits with code 2.
"""

from __future__ import annotations

import dataclasses
import re

from demix.errors import ConfigError

# ------------------------------------------------------------------------------- quantities

# CPU: cores (8, 0.5) or whole millicores (500m): what KFP's set_cpu_limit and Kubernetes both
# take. Bytes: a whole number with a unit KFP's set_memory_limit and Kubernetes both take
# (KFP refuses a fraction and Kubernetes' lower-case `k`; Kubernetes refuses `K` and `KB`).
_CPU = re.compile(r"(?:\d+(?:\.\d+)?|\.\d+|\d+m)")
_BYTES = re.compile(r"(\d+)(Ei|Pi|Ti|Gi|Mi|Ki|E|P|T|G|M)?")
_UNIT = {"": 1, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
_UNIT.update({f"{u}i": 1024 ** (n + 1) for n, u in enumerate("KMGTPE")})
_LOOKS_LIKE_BYTES = re.compile(r"(\d+)\s*([kKmMgGtTpPeE])[iI]?[bB]?")
MIN_BYTES = 2**20  # less than 1 Mi is a forgotten unit, not a size

# Compile settings holding a Kubernetes quantity, with their flag.
CPU_SETTINGS = {"cpu": "--cpu", "cpu_task_cpu": "--cpu-task-cpu"}
BYTE_SETTINGS = {
    "memory": "--memory",
    "cpu_task_memory": "--cpu-task-memory",
    "shm_size": "--shm-size",
    "ephemeral_volume": "--ephemeral-volume",
}


def check_cpu(text: str, flag: str) -> str:
    """`text` when it is a positive Kubernetes CPU quantity; ConfigError naming `flag`."""
    value = str(text).strip()
    if not _CPU.fullmatch(value) or float(value.rstrip("m")) <= 0:
        raise ConfigError(
            f"{flag} {text}: not a Kubernetes CPU quantity; give cores (8, 0.5) or "
            "millicores (500m)"
        )
    return value


def check_bytes(text: str, flag: str) -> str:
    """`text` when it is a Kubernetes quantity of at least 1 Mi bytes that KFP also takes
    (64G, 64Gi); ConfigError naming `flag`, with the spelling meant where it can tell."""
    value = str(text).strip()
    found = _BYTES.fullmatch(value)
    if found and int(found.group(1)) * _UNIT[found.group(2) or ""] >= MIN_BYTES:
        return value
    units = "a whole number with a unit: E, P, T, G, M (powers of 1000) or Ei .. Ki (of 1024)"
    if found:  # a number without a unit, or too small to be meant
        raise ConfigError(f"{flag} {text} is less than 1Mi bytes: give {units}, e.g. 64G")
    hint = f"give {units}"
    if guess := _LOOKS_LIKE_BYTES.fullmatch(value):
        number, unit = guess.group(1), guess.group(2).upper()
        hint = f"say {number}Ki" if unit == "K" else f"say {number}{unit} or {number}{unit}i"
    raise ConfigError(f"{flag} {text}: not a Kubernetes quantity; {hint}")


# ----------------------------------------------------------------------------- accelerators

# Kubeflow: the extended resource name a device plugin advertises (the launcher puts it in the
# container's limits as it is); any well-formed DOMAIN/NAME outside kubernetes.io is accepted.
KUBERNETES_ACCELERATORS = (
    "nvidia.com/gpu",
    "amd.com/gpu",
    "gpu.intel.com/i915",
    "gpu.intel.com/xe",
    "habana.ai/gaudi",
    "google.com/tpu",
)
_DNS_SUBDOMAIN = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*"
_NAME = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?"
_RESOURCE = re.compile(rf"({_DNS_SUBDOMAIN})/({_NAME})")


def vertex_accelerators() -> tuple[str, ...]:
    """Vertex AI's accelerator names: the AcceleratorType enum of google-cloud-aiplatform."""
    from google.cloud.aiplatform_v1.types.accelerator_type import AcceleratorType

    return tuple(a.name for a in AcceleratorType if a.value != 0)  # 0: UNSPECIFIED


def check_accelerator(target: str, name: str) -> str:
    """`name` when the target takes it as an accelerator; ConfigError with the names it takes.

    Kubeflow takes a Kubernetes extended resource name (nvidia.com/gpu); Vertex AI its
    AcceleratorType names (NVIDIA_H100_80GB).
    """
    if target == "vertex":
        names = vertex_accelerators()
        if name in names:
            return name
        hint = (
            " is a Kubernetes resource name; Vertex AI names the GPU model"
            if "/" in name
            else " is not a Vertex AI accelerator"
        )
        raise ConfigError(f"--accelerator-type {name}{hint}: give one of {', '.join(names)}")
    found = _RESOURCE.fullmatch(name)
    if (
        found
        and len(found.group(1)) <= 253
        and len(found.group(2)) <= 63
        and not found.group(1).endswith("kubernetes.io")  # cpu, memory: not extended resources
    ):
        return name
    if re.fullmatch(r"[A-Z0-9_]+", name):
        why = "is a Vertex AI accelerator name; Kubeflow takes the device plugin's resource"
    else:
        why = "is not a Kubernetes extended resource name; Kubeflow takes the device plugin's"
    raise ConfigError(
        f"--accelerator-type {name} {why} name ({', '.join(KUBERNETES_ACCELERATORS)}, ...); "
        "choose the GPU model with --gpu-node-selector (e.g. "
        f"{GKE_ACCELERATOR}=nvidia-h100-80gb) or compile with --target vertex"
    )


# ------------------------------------------------------------------- GPU node selection (k8s)

GKE_ACCELERATOR = "cloud.google.com/gke-accelerator"
EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
_LABEL_KEY = re.compile(rf"(?:({_DNS_SUBDOMAIN})/)?({_NAME})")
_LABEL_VALUE = re.compile(rf"(?:{_NAME})?")


@dataclasses.dataclass(frozen=True)
class Toleration:
    """A pod toleration: of the taint `key` (any value when `value` is None) with `effect`."""

    key: str
    effect: str
    value: str | None = None

    @property
    def operator(self) -> str:
        return "Exists" if self.value is None else "Equal"


# GKE's: its H100 node pools' label, and the taint it puts on every GPU node pool.
DEFAULT_GPU_NODE_SELECTOR = ((GKE_ACCELERATOR, "nvidia-h100-80gb"),)
DEFAULT_GPU_TOLERATIONS = (Toleration("nvidia.com/gpu", "NoSchedule"),)
NONE = "none"  # --gpu-node-selector none / --gpu-toleration none: no selector, no toleration
# Kubernetes has no scheduling timeout a pipeline can set (a pod's activeDeadlineSeconds counts
# from when a node accepted it): what compile says when GPU tasks get the default selector.
DEFAULT_SELECTOR_NOTE = (
    "GPU tasks require nodes labelled "
    + ",".join(f"{k}={v}" for k, v in DEFAULT_GPU_NODE_SELECTOR)
    + " (GKE, H100); where no node has it they stay Pending: give --gpu-node-selector "
    "KEY=VALUE (or none)"
)


def _label_key(key: str, what: str) -> str:
    found = _LABEL_KEY.fullmatch(key)
    if not found or len(found.group(2)) > 63 or len(found.group(1) or "") > 253:
        raise ConfigError(f"{what}: {key!r} is not a Kubernetes label key ([PREFIX/]NAME)")
    return key


def _label_value(value: str, what: str) -> str:
    if not _LABEL_VALUE.fullmatch(value) or len(value) > 63:
        raise ConfigError(
            f"{what}: {value!r} is not a Kubernetes label value (at most 63 letters, digits, "
            "'-', '_', '.', starting and ending with a letter or digit)"
        )
    return value


def _none(items: list[str], flag: str, what: str) -> bool:
    """True for `none` alone; ConfigError when `none` comes with other items."""
    if NONE in items and len(items) > 1:
        raise ConfigError(f"{flag} {NONE} means {what}: give it alone")
    return NONE in items


def parse_node_selector(
    items: list[str] | None, gke_accelerator: str | None = None
) -> tuple[tuple[str, str], ...] | None:
    """`--gpu-node-selector KEY=VALUE ...` (`none`: no selector) as (key, value) pairs;
    `--gpu-node-label VALUE` is GKE's shorthand for KEY cloud.google.com/gke-accelerator.
    None when neither is given (the default). Raises ConfigError for a malformed item."""
    if gke_accelerator is not None:
        if items:
            raise ConfigError(
                f"--gpu-node-label {gke_accelerator} is --gpu-node-selector "
                f"{GKE_ACCELERATOR}={gke_accelerator}: give --gpu-node-selector alone"
            )
        items = [f"{GKE_ACCELERATOR}={gke_accelerator}"]
    if not items:
        return None
    if _none(items, "--gpu-node-selector", "no node selector"):
        return ()
    pairs = {}
    for item in items:
        what = f"--gpu-node-selector {item}"
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"{what}: give KEY=VALUE (e.g. {GKE_ACCELERATOR}=nvidia-h100-80gb)")
        pairs[_label_key(key, what)] = _label_value(value, what)
    return tuple(pairs.items())


def parse_tolerations(items: list[str] | None) -> tuple[Toleration, ...] | None:
    """`--gpu-toleration KEY=VALUE:EFFECT` or `KEY:EFFECT` (any value) ... (`none`: no
    toleration) as Tolerations; None when not given (the default). Raises ConfigError for a
    malformed item or an effect other than NoSchedule, PreferNoSchedule, NoExecute."""
    if not items:
        return None
    if _none(items, "--gpu-toleration", "no toleration"):
        return ()
    found = []
    for item in items:
        what = f"--gpu-toleration {item}"
        rest, sep, effect = item.rpartition(":")
        if not sep or effect not in EFFECTS:
            raise ConfigError(
                f"{what}: give KEY=VALUE:EFFECT or KEY:EFFECT, EFFECT one of {', '.join(EFFECTS)}"
            )
        key, sep, value = rest.partition("=")
        value = _label_value(value, what) if sep else None
        found.append(Toleration(_label_key(key, what), effect, value))
    return tuple(found)


# ----------------------------------------------------------------------------------- images


def check_pullable(image: str, flag: str, default: bool) -> None:
    """Refuse an image under `localhost/`: it exists only where it was built, and a cluster's
    nodes cannot pull it. Raises ConfigError naming the flag and what to do."""
    if image.split("/", 1)[0] == "localhost":
        shown = f"{image} (the default)" if default else image
        raise ConfigError(
            f"{flag} {shown}: an image under localhost/ exists only on the machine that built "
            "it and a cluster cannot pull it; push the images (make push "
            "IMAGE_REPO=REGISTRY/PATH) and give --image/--image-cuda (or DEMIX_IMAGE_REPO), "
            "or pass --allow-local-images where the nodes have them"
        )
