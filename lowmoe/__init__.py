"""lowmoe: prune and merge the experts of Mixture-of-Experts LLMs, one decoder layer at a time."""

__version__ = "0.1.0"
