"""ltr-serve: LLM serving scheduled by a learned ranking of output lengths."""

__version__ = "0.1.0"
