"""Held-out loss: mean next-token cross-entropy of a model on a curated dataset's held-out split.

Computed by demix itself (not lm-eval) from the packed token stream, so it needs no documents,
prompts or detokenizing: the cheapest and least noisy signal a proxy model gives.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

HELDOUT_PREFIX = "heldout:"

# Windows are capped at 256 tokens: enough context for the loss to rank models the same way as
# longer windows would, and every proxy of a run shares the architecture, so the cap is the same
# for all of them; it bounds the logits memory (batch x window x vocab) for large-vocab models.
MAX_WINDOW = 256


def heldout_window(max_length: int | None) -> int:
    """Window length for held-out loss: the model's context, at most MAX_WINDOW."""
    return MAX_WINDOW if max_length is None else max(2, min(int(max_length), MAX_WINDOW))


def heldout_token_windows(tokens: np.ndarray, window: int) -> list[tuple[int, int]]:
    """Non-overlapping (start, length) windows over tokens; each predicts `length` targets."""
    targets = len(tokens) - 1
    return [(start, min(window, targets - start)) for start in range(0, targets, window)]


@torch.no_grad()
def heldout_window_losses(
    model: torch.nn.Module, tokens: np.ndarray, window: int, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return (summed token cross-entropy in nats, scored tokens) of each window, in stream order.

    Token t+1 is predicted from the tokens of its window up to t; windows do not overlap, so every
    token after the first is scored exactly once. The model must already be in eval mode.
    """
    device = next(model.parameters()).device
    windows = heldout_token_windows(tokens, window)
    sums = np.zeros(len(windows), dtype=np.float64)
    counts = np.array([length for _, length in windows], dtype=np.int64)
    # Equal-length windows share a batch; only the last window can be shorter.
    by_length: dict[int, list[int]] = {}
    for index, (_, length) in enumerate(windows):
        by_length.setdefault(length, []).append(index)
    for length, indices in by_length.items():
        for i in range(0, len(indices), batch_size):
            chunk_indices = indices[i : i + batch_size]
            starts = [windows[index][0] for index in chunk_indices]
            chunk = np.stack([tokens[s : s + length + 1] for s in starts])
            ids = torch.from_numpy(chunk.astype(np.int64)).to(device)
            logits = model(input_ids=ids[:, :-1]).logits.float()
            loss = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            sums[chunk_indices] = loss.sum(dim=1).double().cpu().numpy()
    return sums, counts


def window_loss_summary(sums: np.ndarray, counts: np.ndarray) -> tuple[float, float]:
    """(mean token loss over all windows' tokens, stderr of the per-window mean losses)."""
    mean = float(sums.sum() / counts.sum())
    per_window = sums / counts
    stderr = (
        float(per_window.std(ddof=1) / math.sqrt(len(per_window)))
        if len(per_window) > 1
        else float("nan")
    )
    return mean, stderr


def heldout_loss(
    model: torch.nn.Module, tokens: np.ndarray, window: int, batch_size: int
) -> tuple[float, float, int]:
    """Return (mean token cross-entropy in nats, its stderr over windows, number of windows).

    The windows are those of `heldout_window_losses`. The model must already be in eval mode.
    """
    sums, counts = heldout_window_losses(model, tokens, window, batch_size)
    mean, stderr = window_loss_summary(sums, counts)
    return mean, stderr, len(sums)
