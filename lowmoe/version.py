"""lowmoe's version (one place: the package, the reports and the model card read it)."""

__version__ = "0.1.0"
