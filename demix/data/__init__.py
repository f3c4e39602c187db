"""Data: demo corpus fetch, curation into packed token streams, the mixture sampler."""

from demix.data.curate import curate
from demix.data.demo import fetch_demo
from demix.data.shards import CuratedData, MixtureSampler
from demix.data.sources import dataset_files, normalize

__all__ = ["CuratedData", "MixtureSampler", "curate", "dataset_files", "fetch_demo", "normalize"]
