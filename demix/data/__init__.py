"""Data: demo corpus fetch, curation into packed token streams, the mixture sampler."""

from demix.data.curate import curate, dataset_files, normalize
from demix.data.demo import fetch_demo
from demix.data.shards import CuratedData, MixtureSampler

__all__ = ["CuratedData", "MixtureSampler", "curate", "dataset_files", "fetch_demo", "normalize"]
