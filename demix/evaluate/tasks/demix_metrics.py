"""Per-document metric of the bundled bits-per-byte tasks (loaded by lm-eval via `!function`).

lm-eval aggregates the (log-likelihood, bytes) pairs with its weighted `bits_per_byte`:
-sum(log-likelihoods) / sum(bytes) / ln 2.
"""


def scored_text(context: str, continuation: str) -> str:
    """The text lm-eval actually scores for a (context, continuation) request."""
    # lm-eval moves the context's trailing whitespace onto the continuation before tokenizing
    # (lm_eval.api.model.TemplateLM._encode_pair), so those bytes are scored too and must count.
    stripped = context.rstrip()
    return context[len(stripped) :] + continuation


def process_bpb(doc: dict, results: list[tuple[float, bool]]) -> dict[str, tuple[float, int]]:
    """Return {"bits_per_byte": (log-likelihood, UTF-8 bytes scored)} for one document."""
    ((loglikelihood, _is_greedy),) = results
    text = scored_text(doc["context"], doc["continuation"])
    return {"bits_per_byte": (loglikelihood, len(text.encode("utf-8")))}
