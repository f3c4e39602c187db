"""DeMix: data-mixture search for LLM pre-training by model merging."""

__version__ = "0.1.0"
