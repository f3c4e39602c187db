"""The container images components run in: the ones `make images` builds and `make push` pushes.

The names here are defaults, tied to the package version. A compile chooses the images with
`pipeline.py compile --image IMG --image-cuda IMG` (a tag or a digest); DEMIX_IMAGE_REPO, when
set, replaces the default repository (`localhost`, where podman keeps images built here).
Compile refuses images under `localhost/` (no cluster can pull them) unless given
`--allow-local-images`; local runs (kfp.local) use no image at all.
"""

import os
import re

from demix import __version__ as VERSION

REPO = os.environ.get("DEMIX_IMAGE_REPO") or "localhost"
CPU_IMAGE = f"{REPO}/demix:{VERSION}-cpu"
CUDA_IMAGE = f"{REPO}/demix:{VERSION}-cuda"

# NAME[:TAG][@sha256:DIGEST], NAME = [HOST[:PORT]/]PATH (the OCI distribution grammar, simplified).
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REFERENCE = re.compile(
    rf"(?:[A-Za-z0-9.-]+(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?"
)


def check_image(reference: str, flag: str) -> str:
    """`reference` when it is an image name with a tag or a digest; ValueError naming `flag`."""
    if not _REFERENCE.fullmatch(reference) or not re.search(r":[^/]+$|@sha256:", reference):
        raise ValueError(
            f"{flag} {reference!r} is not an image reference; give REGISTRY/PATH:TAG or "
            "REGISTRY/PATH@sha256:<64 hex digits>"
        )
    return reference
