"""synthfb: synthetic training data and AI feedback for language models."""

__version__ = "0.1.0"
