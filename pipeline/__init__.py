"""pipeline: batch LLM inference over tables."""

__version__ = "0.1.0"
