"""Log-likelihoods of many (context, continuation) token requests at forward-pass cost.

A request is scored as lm-eval's HFLM scores it: the model reads
`(context + continuation)[-(max_length + 1):][:-1]` from position 0 and the continuation's tokens
are scored from the last `len(continuation)` logits. Only the layout of the work differs, which
changes no number beyond float noise:

- Requests that read the same (possibly left-truncated) context form a *tree*, one row of a
  batch: the context once, then each continuation as a branch that attends to the context and to
  itself only (a 4-D attention mask), with position ids continuing from the context as if the
  branch were alone. The choices of a multiple-choice question cost one context, not one each.
- Rows are sorted by length and batched up to a token budget, so padding is only the few tokens
  between rows of nearly equal length (HFLM pads every request to the longest of its batch).
- Logits are projected only where a scored token is predicted (`logits_to_keep`), so the
  vocabulary projection and log-softmax skip every context position.
- Attention runs through PyTorch's fused SDPA kernel whenever the model supports it, whatever
  attention the model is configured with (restored afterwards): it takes the custom mask and is
  about 2x faster than eager attention on these batches on CPU. Eager and SDPA compute the same
  function; models without SDPA keep eager attention with an additive mask.

Packing several trees into one row was measured too: no faster on CPU than one tree per row
(attention across packed trees is computed and masked away), so rows stay one tree each.

The layout is planned once from token ids (`plan_requests`); `score_plan` runs it for a model.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

Tokens = tuple[int, ...]

# Trees longer than this (a long context with many long choices) are split into rows that each
# repeat the context, unless the model's context is longer: attention work grows with the square
# of the row length.
MAX_ROW_TOKENS = 2048

# Rows per batch are also capped so that the attention mask (rows x width x width) stays within
# this many elements (512 MB in float32).
MAX_MASK_ELEMENTS = 2**27

# Attention implementations that apply a custom 4-D mask as given.
MASKED_ATTENTION = ("eager", "sdpa")

# A plan keeps its attention masks between models when they take at most this many bytes.
MASK_CACHE_BYTES = 2**28


@dataclass(frozen=True)
class TokenRequest:
    """One scored continuation: context and continuation token ids, as HFLM splits them."""

    context: Tokens
    continuation: Tokens


@dataclass
class Batch:
    """One forward pass: rows of trees, and where each scored token's log-probability comes from.

    `branch` is 0 on context tokens, k on the k-th branch and -1 on padding; a token attends to
    earlier tokens of its row that are context or on its own branch. `kept` marks the positions
    whose logits are needed; `source` indexes those kept logits (row-major order), `target` is
    the token scored there and `request` the unique request it belongs to.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    branch: torch.Tensor
    kept: torch.Tensor
    source: torch.Tensor
    target: torch.Tensor
    request: torch.Tensor

    @property
    def tokens(self) -> int:
        """Non-padding tokens the model reads in this batch."""
        return int((self.branch >= 0).sum())


@dataclass
class Plan:
    """Scored requests laid out in batches; `unique_of[i]` is request i's unique request."""

    batches: list[Batch]
    unique_of: np.ndarray
    n_unique: int
    _masks: dict[tuple[str, torch.dtype, torch.device], list[torch.Tensor]] = field(
        default_factory=dict, repr=False
    )

    @property
    def tokens(self) -> int:
        """Tokens the model reads for the whole plan (no padding)."""
        return sum(batch.tokens for batch in self.batches)

    def masks(
        self, implementation: str, dtype: torch.dtype, device: torch.device
    ) -> Iterator[torch.Tensor]:
        """The attention mask of each batch for this attention implementation, kept when small."""
        key = (implementation, dtype, device)
        if key in self._masks:
            yield from self._masks[key]
            return
        element_bytes = 1 if implementation == "sdpa" else torch.finfo(dtype).bits // 8
        size = sum(b.branch.shape[0] * b.branch.shape[1] ** 2 for b in self.batches)
        keep = size * element_bytes <= MASK_CACHE_BYTES
        built = []
        for batch in self.batches:
            mask = attention_mask(batch, implementation, dtype, device)
            if keep:
                built.append(mask)
            yield mask
        if keep:
            self._masks[key] = built


@dataclass
class _Tree:
    """A context and the branches (unique request ids and continuations) that share it."""

    context: Tokens
    branches: list[tuple[int, Tokens]]

    @property
    def size(self) -> int:
        # A branch reads its continuation but the last token, which is only a target.
        return len(self.context) + sum(len(cont) - 1 for _, cont in self.branches)


def effective_context(request: TokenRequest, max_length: int) -> Tokens:
    """The context tokens the model actually reads: HFLM keeps the last max_length + 1 tokens."""
    whole = (request.context + request.continuation)[-(max_length + 1) :]
    return whole[: len(whole) - len(request.continuation)]


def plan_requests(requests: Sequence[TokenRequest], max_length: int, rows_per_batch: int) -> Plan:
    """Lay out requests as trees in batches of about rows_per_batch x max_length tokens.

    Raises ValueError when a request has an empty context or continuation, or a continuation
    longer than max_length (lm-eval cannot score those either).
    """
    unique: dict[TokenRequest, int] = {}
    unique_of = np.empty(len(requests), dtype=np.int64)
    trees: dict[Tokens, _Tree] = {}
    for index, request in enumerate(requests):
        _check_request(request, max_length)
        if request not in unique:
            unique[request] = len(unique)
            context = effective_context(request, max_length)
            tree = trees.setdefault(context, _Tree(context, []))
            tree.branches.append((unique[request], request.continuation))
        unique_of[index] = unique[request]
    row_tokens = max(max_length, MAX_ROW_TOKENS)
    pieces = [piece for tree in trees.values() for piece in _split_tree(tree, row_tokens)]
    pieces.sort(key=lambda piece: -piece.size)
    return Plan(_batches(pieces, rows_per_batch * max_length), unique_of, len(unique))


def _check_request(request: TokenRequest, max_length: int) -> None:
    if not request.context or not request.continuation:
        raise ValueError("a request needs a non-empty context and continuation")
    if len(request.continuation) > max_length:
        raise ValueError(
            f"a {len(request.continuation)}-token continuation does not fit the model's context "
            f"of {max_length}"
        )


def _split_tree(tree: _Tree, row_tokens: int) -> list[_Tree]:
    """Split a tree longer than row_tokens into trees that each repeat the context."""
    pieces = [_Tree(tree.context, [])]
    for branch in tree.branches:
        extra = len(branch[1]) - 1
        if pieces[-1].branches and pieces[-1].size + extra > row_tokens:
            pieces.append(_Tree(tree.context, []))
        pieces[-1].branches.append(branch)
    return pieces


def _batches(pieces: list[_Tree], batch_tokens: int) -> list[Batch]:
    """Consecutive trees (sorted by size, largest first) as rows of batches of about batch_tokens."""
    batches, start = [], 0
    while start < len(pieces):
        width = pieces[start].size
        rows = max(1, min(batch_tokens // width, MAX_MASK_ELEMENTS // width**2))
        batches.append(_build_batch(pieces[start : start + rows], width))
        start += rows
    return batches


def _build_batch(trees: list[_Tree], width: int) -> Batch:
    shape = (len(trees), width)
    input_ids = np.zeros(shape, dtype=np.int64)
    position_ids = np.zeros(shape, dtype=np.int64)
    branch = np.full(shape, -1, dtype=np.int64)
    # (row, column) of each scored token's predicting position, the token, its unique request.
    scored: list[tuple[int, int, int, int]] = []
    for row, tree in enumerate(trees):
        n_context = len(tree.context)
        input_ids[row, :n_context] = tree.context
        position_ids[row, :n_context] = np.arange(n_context)
        branch[row, :n_context] = 0
        column = n_context
        for number, (request, continuation) in enumerate(tree.branches, 1):
            reads = continuation[:-1]
            span = slice(column, column + len(reads))
            input_ids[row, span] = reads
            position_ids[row, span] = np.arange(n_context, n_context + len(reads))
            branch[row, span] = number
            # Token 0 is predicted at the context's last position, token j at the branch's j - 1.
            predictors = [n_context - 1, *range(column, column + len(reads))]
            scored.extend(
                (row, col, token, request)
                for col, token in zip(predictors, continuation, strict=True)
            )
            column += len(reads)
    rows, cols, targets, requests = (np.array(v, dtype=np.int64) for v in zip(*scored, strict=True))
    kept = np.zeros(shape, dtype=bool)
    kept[rows, cols] = True
    # The model returns kept logits in row-major order of `kept`: number the kept positions.
    kept_index = np.cumsum(kept.ravel()).reshape(shape) - 1
    return Batch(
        input_ids=torch.from_numpy(input_ids),
        position_ids=torch.from_numpy(position_ids),
        branch=torch.from_numpy(branch),
        kept=torch.from_numpy(kept),
        source=torch.from_numpy(kept_index[rows, cols]),
        target=torch.from_numpy(targets),
        request=torch.from_numpy(requests),
    )


def attention_mask(
    batch: Batch, implementation: str, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """4-D mask (rows, 1, query, key) of a batch: boolean (True = attend) for SDPA, additive
    (0 or the dtype's min) for eager attention."""
    branch = batch.branch.to(device)
    width = branch.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    # Context (branch 0) is visible to its whole row, a branch only to itself. Padding (branch -1)
    # sees earlier padding only, so no softmax row is empty.
    key, query = branch[:, None, :], branch[:, :, None]
    visible = (((key == 0) | (key == query)) & causal)[:, None]
    if implementation == "sdpa":
        return visible
    additive = torch.zeros(visible.shape, dtype=dtype, device=device)
    return additive.masked_fill_(~visible, torch.finfo(dtype).min)


def supports_packing(model: torch.nn.Module) -> str | None:
    """None when the model can run packed rows exactly; otherwise the reason it cannot."""
    config = getattr(model, "config", None)
    if _packing_attention(model) is None:
        implementation = getattr(config, "_attn_implementation", None)
        return (
            f"attention implementation {implementation!r} and no SDPA support (packing needs "
            f"one of {MASKED_ATTENTION})"
        )
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    if getattr(config, "sliding_window", None) is not None and getattr(
        config, "use_sliding_window", True
    ):
        return "sliding-window attention (a custom mask would override the window)"
    return None


def _packing_attention(model: torch.nn.Module) -> str | None:
    """SDPA when the model supports it, else its configured attention if that takes a mask."""
    if getattr(model, "_supports_sdpa", False) and hasattr(model, "set_attn_implementation"):
        return "sdpa"
    configured = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return configured if configured in MASKED_ATTENTION else None


@contextlib.contextmanager
def packing_attention(model: torch.nn.Module) -> Iterator[str]:
    """Run the model with the attention `supports_packing` chose; the configured one is restored.

    Raises ValueError for a model without such an attention (see supports_packing).
    """
    chosen = _packing_attention(model)
    configured = model.config._attn_implementation
    if chosen is None:
        raise ValueError(f"cannot pack requests for a model with {configured!r} attention")
    if chosen != configured:
        model.set_attn_implementation(chosen)
    try:
        yield model.config._attn_implementation
    finally:
        if chosen != configured:
            model.set_attn_implementation(configured)


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.no_grad()
def score_plan(model: torch.nn.Module, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """(log-likelihood, is greedy) of every unique request of the plan, as HFLM computes them.

    The model must be in eval mode. Log-softmax runs in the model's dtype, as HFLM's does.
    Raises ValueError for a model that cannot run packed rows (see supports_packing).
    """
    parameter = next(model.parameters())
    keep_logits = _accepts_logits_to_keep(model)
    sums = torch.zeros(plan.n_unique, dtype=torch.float64)
    misses = torch.zeros(plan.n_unique, dtype=torch.int64)
    with packing_attention(model) as implementation:
        masks = plan.masks(implementation, parameter.dtype, parameter.device)
        for batch, mask in zip(plan.batches, masks, strict=True):
            logits = _kept_logits(model, batch, mask, keep_logits)
            logprobs = F.log_softmax(logits, dim=-1)
            source = batch.source.to(parameter.device)
            target = batch.target.to(parameter.device)
            sums.index_add_(0, batch.request, logprobs[source, target].double().cpu())
            greedy = logprobs.argmax(dim=-1)[source] == target
            misses.index_add_(0, batch.request, (~greedy).long().cpu())
    return sums.numpy(), (misses == 0).numpy()


def _kept_logits(
    model: torch.nn.Module, batch: Batch, mask: torch.Tensor, keep_logits: bool
) -> torch.Tensor:
    """Logits (kept positions, vocab) of one batch, in row-major order of batch.kept."""
    kept = batch.kept.to(mask.device)
    logits = model(
        input_ids=batch.input_ids.to(mask.device),
        attention_mask=mask,
        position_ids=batch.position_ids.to(mask.device),
        use_cache=False,
        **({"logits_to_keep": kept} if keep_logits else {}),
    ).logits
    if logits.dim() == 3 and logits.shape[:2] == kept.shape:
        return logits[kept]
    if logits.dim() != 2 or logits.shape[0] != int(batch.kept.sum()):
        raise RuntimeError(
            f"{type(model).__name__} returned logits of shape {tuple(logits.shape)} for "
            f"logits_to_keep of shape {tuple(kept.shape)}; use evaluate.engine: lm-eval"
        )
    return logits
