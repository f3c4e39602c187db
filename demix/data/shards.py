"""Packed token streams of a curated dataset, and the weighted mixture sampler over them."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from demix.errors import DataError
from demix.storage import read_manifest

DATASET_KIND = "demix.dataset"


class CuratedData:
    """Read side of a curated dataset artifact (see demix.data.curate).

    Raises DataError when the folder has no manifest of the right kind.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest = read_manifest(self.root, kind=DATASET_KIND)
        self.names: list[str] = list(self.manifest["datasets"])
        self.vocab_size: int = self.manifest["vocab_size"]
        self.eos_token_id: int = self.manifest["eos_token_id"]
        self.dtype = np.dtype(self.manifest["dtype"])
        self.token_prior: dict[str, float] = self.manifest["token_prior"]
        self.train_tokens = {n: d["train_tokens"] for n, d in self.manifest["datasets"].items()}
        self.tokenizer_dir = self.root / self.manifest["tokenizer"]

    def tokens(self, name: str, split: str = "train") -> np.ndarray:
        """Memory-mapped token stream of one dataset split ("train" or "heldout")."""
        if name not in self.manifest["datasets"]:
            raise DataError(f"{self.root}: no dataset named {name!r}; known: {self.names}")
        path = self.root / name / f"{split}.bin"
        return np.memmap(path, dtype=self.dtype, mode="r")

    @functools.cache  # noqa: B019 (one tokenizer per artifact, for the process lifetime)
    def load_tokenizer(self):
        from demix.model import load_tokenizer

        return load_tokenizer(self.tokenizer_dir)


class MixtureSampler:
    """Batches of token windows drawn from datasets in proportion to `weights`.

    Rows per dataset per batch come from a carried credit (credit += w * B; whole rows are
    taken, leftover rows go to the largest fractional credits), so the realised mixture tracks
    w exactly over time. Each dataset is cut into non-overlapping windows of seq_len + 1
    tokens, visited in a seeded permutation per epoch: no window repeats within an epoch.
    The state (cursor per dataset, credit) is all an exact resume needs.
    """

    def __init__(self, data: CuratedData, weights: dict[str, float], seq_len: int, batch_size: int,
                 seed: int):
        from demix.search.sampler import validate_mixture

        self.data, self.seq_len, self.batch_size, self.seed = data, seq_len, batch_size, seed
        self.names = data.names
        self.weights = validate_mixture(weights, self.names)
        self.streams = {}
        for name, w in zip(self.names, self.weights, strict=True):
            if w == 0:
                continue
            tokens = data.tokens(name)
            if len(tokens) < seq_len + 1:
                raise DataError(f"{data.root}: dataset {name!r} has {len(tokens)} tokens, fewer than one "
                                f"training window of {seq_len + 1}; lower train.seq_len or add data")
            self.streams[name] = tokens
        self.cursors = dict.fromkeys(self.names, 0)
        self.credit = np.zeros(len(self.names))

    def _windows(self, name: str) -> int:
        return len(self.streams[name]) // (self.seq_len + 1)

    @functools.lru_cache(maxsize=8)  # noqa: B019 (one live permutation per dataset)
    def _permutation(self, index: int, epoch: int, n: int) -> np.ndarray:
        return np.random.default_rng([self.seed, index, epoch]).permutation(n)

    def _row_counts(self) -> np.ndarray:
        self.credit += self.weights * self.batch_size
        counts = np.floor(self.credit + 1e-9).astype(np.int64)
        missing = self.batch_size - int(counts.sum())
        if missing > 0:
            order = np.lexsort((np.arange(len(counts)), -(self.credit - counts)))
            counts[order[:missing]] += 1
        self.credit -= counts
        return counts

    def next_batch(self) -> np.ndarray:
        """int64 [batch_size, seq_len + 1]: inputs are [:, :-1], targets [:, 1:]."""
        width = self.seq_len + 1
        batch = np.empty((self.batch_size, width), dtype=np.int64)
        row = 0
        for index, (name, count) in enumerate(zip(self.names, self._row_counts(), strict=True)):
            if count == 0:
                continue
            n = self._windows(name)
            for _ in range(count):
                k = self.cursors[name]
                window = self._permutation(index, k // n, n)[k % n]
                batch[row] = self.streams[name][window * width:(window + 1) * width]
                self.cursors[name] = k + 1
                row += 1
        return batch

    def state_dict(self) -> dict:
        """JSON-serialisable data position."""
        return {"cursors": dict(self.cursors), "credit": self.credit.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.cursors = {n: int(state["cursors"].get(n, 0)) for n in self.names}
        self.credit = np.array(state["credit"], dtype=np.float64)
