"""The container images components run in: the ones `make images` builds and pushes.

Set DEMIX_IMAGE_REPO (e.g. your Artifact Registry path) when compiling and when building.
"""

import os

VERSION = "0.1.0"
REPO = os.environ.get("DEMIX_IMAGE_REPO", "demix")
CPU_IMAGE = f"{REPO}/demix:{VERSION}-cpu"
CUDA_IMAGE = f"{REPO}/demix:{VERSION}-cuda"
