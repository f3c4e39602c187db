"""The evaluation batch: how many packed rows one forward pass holds.

`evaluate.batch_size: auto` sizes it from the device's free memory
(demix.device_memory.free_memory) and the model's shape, once per evaluator, at its first model: a row of `width` tokens holds the
logits and their log-softmax (`vocab` values each, in the model's dtype) and a few hidden states
per layer. Half of the free memory is used, and at most 256 rows on a GPU and 32 on a CPU (the
CPU's former default batch); both caps are settings of this module, not measured optima.
"""

from __future__ import annotations

import logging

import torch

from demix import device_memory

log = logging.getLogger(__name__)

AUTO_SHARE = 0.5
AUTO_MAX_ROWS = {"cuda": 256, "cpu": 32}
_ACTIVATIONS_PER_LAYER = 12  # hidden-size vectors per token alive in one layer's forward


def row_bytes(model: torch.nn.Module, width: int) -> int:
    """Memory one packed row of `width` tokens needs in a forward pass of `model`."""
    config = model.config
    vocab = model.get_input_embeddings().num_embeddings
    element = next(model.parameters()).element_size()
    hidden = config.hidden_size * config.num_hidden_layers * _ACTIVATIONS_PER_LAYER
    return width * element * (2 * vocab + hidden)


def auto_batch_rows(model: torch.nn.Module, width: int, device: torch.device) -> int:
    """Rows per forward pass for `evaluate.batch_size: auto` (logged with its inputs)."""
    free = device_memory.free_memory(device)[0]
    per_row = row_bytes(model, width)
    cap = AUTO_MAX_ROWS.get(device.type, AUTO_MAX_ROWS["cpu"])
    rows = max(1, min(cap, int(AUTO_SHARE * free // per_row)))
    log.info(
        "evaluation batch: %d rows of %d tokens (auto: %.1f MB per row, %.1f GB free on %s)",
        rows,
        width,
        per_row / 1e6,
        free / 1e9,
        device,
    )
    return rows
