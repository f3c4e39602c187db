"""Packed token streams of a curated dataset, and the weighted mixture sampler over them."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from demix.errors import DataError
from demix.storage import read_manifest, verify_artifact

DATASET_KIND = "demix.dataset"
SPLITS = ("train", "heldout")


class CuratedData:
    """Read side of a curated dataset artifact (see demix.data.curate). Its manifest's fields
    are checked on construction; before a token stream or the tokenizer is first read, the
    folder is verified to be exactly its manifest (demix.storage.verify_artifact, each file
    hashed once per process).

    Raises DataError when the folder has no manifest of the right kind or a manifest field is
    wrong.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest = read_manifest(self.root, kind=DATASET_KIND)
        self._verified = False
        self.names: list[str] = list(self.manifest["datasets"])
        # Datasets curated for evaluation only (data.targets): a held-out split, never trained on.
        self.targets: list[str] = list(self.manifest.get("targets", {}))
        self.vocab_size: int = int(self.manifest["vocab_size"])
        self.eos_token_id: int = int(self.manifest["eos_token_id"])
        self.dtype = np.dtype(self.manifest["dtype"])
        self.token_prior: dict[str, float] = dict(self.manifest["token_prior"])
        self.train_tokens = {
            n: int(d["train_tokens"]) for n, d in self.manifest["datasets"].items()
        }
        # The whole dataset's train tokens: counted, or estimated from a sample (data.max_tokens).
        # What a training run on the full corpus repeats: epochs and search.max_epochs use it.
        self.full_train_tokens = {
            n: int(d.get("full_train_tokens", d["train_tokens"]))
            for n, d in self.manifest["datasets"].items()
        }
        self.tokenizer_dir = self.root / self.manifest["tokenizer"]

    def tokens(self, name: str, split: str = "train") -> np.ndarray:
        """Memory-mapped token stream of one dataset split ("train" or "heldout"; a target has
        only "heldout").

        Raises DataError for an unknown dataset or split, a missing or truncated file, or an
        artifact that is not exactly its manifest.
        """
        stats = self.manifest["datasets"].get(name) or self.manifest.get("targets", {}).get(name)
        if stats is None:
            raise DataError(
                f"{self.root}: no dataset named {name!r}; known: {self.names + self.targets}"
            )
        if split not in SPLITS:
            raise DataError(f"{self.root}: no split {split!r}; use one of {list(SPLITS)}")
        if name in self.targets and split != "heldout":
            raise DataError(f"{self.root}: {name!r} is a target, held out only; never trained on")
        path = self.root / name / f"{split}.bin"
        expected = int(stats[f"{split}_tokens"])
        size = path.stat().st_size if path.is_file() else None
        if size != expected * self.dtype.itemsize:
            raise DataError(
                f"{path}: {'missing' if size is None else f'{size} bytes'}, expected "
                f"{expected} {self.dtype.name} tokens by {self.root / 'manifest.json'}; curate again"
            )
        self.verify()
        if expected == 0:  # np.memmap refuses empty files
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(path, dtype=self.dtype, mode="r")

    @functools.cache  # noqa: B019 (one tokenizer per artifact, for the process lifetime)
    def load_tokenizer(self):
        """The artifact's tokenizer. Raises ModelError when it cannot be loaded."""
        from demix.model import load_tokenizer

        self.verify()
        return load_tokenizer(self.tokenizer_dir)

    def verify(self) -> None:
        """Check, once per instance, that the folder is exactly its manifest.

        Raises DataError naming the file that is unlisted, missing or changed.
        """
        if not self._verified:
            verify_artifact(self.root, self.manifest)
            self._verified = True


class MixtureSampler:
    """Batches of token windows drawn from datasets in proportion to `weights`.

    Rows per dataset per batch come from a carried credit (credit += w * B; whole rows are
    taken, leftover rows go to the largest remaining credits, ties by dataset order), so the
    realised mixture tracks w exactly over time. Each dataset is cut into non-overlapping
    windows of seq_len + 1 tokens; the k-th row drawn from dataset d is window
    perm[k mod n] of epoch k // n, perm seeded by (seed, d, epoch): no window repeats within an
    epoch. The state (cursor per dataset, credit) is all an exact resume needs. Under several
    processes, each plans the same global batch and reads its own rows (`next_batch(part, parts)`).
    Raises MixtureError for weights off the simplex, DataError for a dataset with weight > 0
    and fewer tokens than one window.
    """

    def __init__(
        self, data: CuratedData, weights: dict[str, float], seq_len: int, batch_size: int, seed: int
    ):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be >= 1")
        self.data, self.seq_len, self.batch_size, self.seed = data, seq_len, batch_size, seed
        from demix.mixtures import validate_mixture

        self.names = list(data.names)
        w = validate_mixture(weights, self.names)
        # Exactly on the simplex, so the credit total stays at zero over any number of batches.
        self.weights = w / w.sum()
        self.width = seq_len + 1
        self.streams: dict[str, np.ndarray] = {}
        for name, weight in zip(self.names, self.weights, strict=True):
            if weight == 0:
                continue
            tokens = data.tokens(name)
            if len(tokens) < self.width:
                raise DataError(
                    f"{data.root}: dataset {name!r} has {len(tokens)} train tokens, fewer than "
                    f"one window of seq_len + 1 = {self.width}; lower train.seq_len or add data"
                )
            self.streams[name] = tokens
        self.cursors = dict.fromkeys(self.names, 0)
        self.credit = np.zeros(len(self.names))
        self._perms: dict[int, tuple[int, np.ndarray]] = {}

    def _row_counts(self) -> np.ndarray:
        """Rows per dataset for the next batch (advances the credit)."""
        credit = self.credit + self.weights * self.batch_size
        counts = np.floor(np.maximum(credit, 0.0)).astype(np.int64)
        # Float rounding can leave a whole row too many; take it from the smallest remainder.
        while counts.sum() > self.batch_size:
            rest = np.where(counts > 0, credit - counts, np.inf)
            counts[int(np.argmin(rest))] -= 1
        for _ in range(self.batch_size - int(counts.sum())):
            counts[int(np.argmax(credit - counts))] += 1  # argmax: first on ties
        self.credit = credit - counts
        return counts

    def _window(self, index: int, k: int) -> int:
        n = len(self.streams[self.names[index]]) // self.width
        epoch = k // n
        cached = self._perms.get(index)
        if cached is None or cached[0] != epoch:
            perm = np.random.default_rng([self.seed, index, epoch]).permutation(n)
            cached = self._perms[index] = (epoch, perm)
        return int(cached[1][k % n])

    def plan_batch(self) -> list[tuple[int, int]]:
        """The next global batch as (dataset index, window index) per row; advances the position."""
        plan = []
        for index, count in enumerate(self._row_counts()):
            name = self.names[index]
            for _ in range(int(count)):
                k = self.cursors[name]
                plan.append((index, self._window(index, k)))
                self.cursors[name] = k + 1
        return plan

    def next_batch(self, part: int = 0, parts: int = 1) -> np.ndarray:
        """int64 [batch_size // parts, seq_len + 1]: inputs are [:, :-1], targets [:, 1:].

        The global batch is planned whole on every process, so the position (and the state) is
        the same everywhere; process `part` of `parts` reads only rows part, part + parts, ...
        of it. The default is the whole batch.
        """
        if not 0 <= part < parts or self.batch_size % parts:
            raise ValueError(f"part {part} of {parts}: batch_size={self.batch_size} must split")
        rows = self.plan_batch()[part::parts]
        batch = np.empty((len(rows), self.width), dtype=np.int64)
        for row, (index, window) in enumerate(rows):
            start = window * self.width
            batch[row] = self.streams[self.names[index]][start : start + self.width]
        return batch

    def state_dict(self) -> dict:
        """JSON-serialisable data position: {"cursors": {name: rows drawn}, "credit": [...]}."""
        return {"cursors": dict(self.cursors), "credit": [float(c) for c in self.credit]}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved by state_dict. Raises DataError for a state of other datasets."""
        cursors, credit = state.get("cursors"), state.get("credit")
        if (
            not isinstance(cursors, dict)
            or set(cursors) != set(self.names)
            or not isinstance(credit, list)
            or len(credit) != len(self.names)
        ):
            raise DataError(
                f"sampler state does not match the datasets {self.names}; it was saved for "
                "another curated dataset, start without it"
            )
        self.cursors = {n: int(cursors[n]) for n in self.names}
        self.credit = np.array(credit, dtype=np.float64)
