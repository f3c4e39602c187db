"""Upper bounds of the run config's sizes: what one machine or one pipeline can hold.

A config over a bound is refused by the schema, in one line naming the key, before anything
is read or allocated (`demix check-config` too). The bounds are generous on purpose: the
largest open models (405B parameters: hidden 16,384, intermediate 53,248, 126 layers, 128
heads, a 128k vocabulary) are well inside them, so a 70B-class architecture always passes
the schema; whether it fits the machine it runs on is the memory plan's call
(demix.memory_plans), which counts the bytes against the device's free memory. The bounds
only keep a typo or a hostile file (a million layers, 10^12 candidates) from reaching an
allocator or a loop that would run for days.
"""

from __future__ import annotations

# The architecture of a model built from config (model.architecture).
MAX_HIDDEN_SIZE = 65_536  # 4x the largest open model's
MAX_INTERMEDIATE_SIZE = 262_144  # about 5x
MAX_LAYERS = 1_024  # 8x
MAX_HEADS = 1_024
MAX_POSITIONS = 1 << 20  # a million-token context
MAX_VOCAB_SIZE = 1 << 20  # a BPE trained by curation (data.tokenizer.vocab_size is smaller)

# Training (train.*): rows of seq_len tokens per optimizer step, and token budgets.
MAX_SEQ_LEN = 1 << 20
MAX_BATCH_ROWS = 1 << 20  # a million rows per step (large runs use a few thousand)
MAX_TRAINING_TOKENS = 10**15  # 1,000 T tokens (the largest runs use about 15 T)

# The search (search.*, decision.*): proxies are each a merged (or trained) model evaluated;
# candidates are sampled mixtures held in memory, a few kB each.
MAX_PROXIES = 100_000  # search.n, decision.merged_proxies
MAX_ROUNDS = 32  # search.rounds: each halves the round size (2^32 >> any n)
MAX_CANDIDATES = 100_000_000  # search.candidates, decision.candidates, top_k
MAX_SAMPLER_SCALES = 10_000
MAX_PREDICTOR_ITERATIONS = 100_000
MAX_PREDICTOR_LEAVES = 131_072  # LightGBM's own limit

# Trained models per run: references (fidelity.references), seeds of the protocol and finals.
MAX_REFERENCES = 10_000
MAX_SEEDS = 100

# Evaluation (evaluate.*) and curation (data.*).
MAX_EVAL_BATCH = 65_536
MAX_EVAL_DOCUMENTS = 100_000_000  # evaluate.limit, heldout_tokens, held-out documents
MAX_CURATE_GROUPS = 10_000  # one pipeline task each
MAX_TOKENIZER_SAMPLE_CHARS = 2_000_000_000  # the BPE trainer holds its sample in memory
MAX_SHARD_BYTES = 1 << 36  # merge.shard_bytes: 64 GiB, a shard is built in memory

# One document as read (a JSONL line, a text file, a Parquet/Arrow value): data.max_document_bytes
DEFAULT_MAX_DOCUMENT_BYTES = 4 << 20  # 4 MiB: a long book; web pages are a few kB
MAX_DOCUMENT_BYTES = 1 << 30  # 1 GiB
MIN_DOCUMENT_BYTES = 1 << 10
