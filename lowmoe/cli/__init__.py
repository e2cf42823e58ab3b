"""The ``lowmoe`` command line: a thin click layer over the Python API.

``main`` (``commands.py``) is the command group with ``synth``, ``inspect``, ``families``, ``prune`` and
``demo``; ``eval`` and ``score`` live in their own modules and are added here.
"""

from .eval import eval_command
from .commands import main
from .score import score_command

main.add_command(eval_command, "eval")
main.add_command(score_command, "score")

__all__ = ["main"]
