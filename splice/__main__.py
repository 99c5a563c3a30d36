"""``python -m splice``: the same command line as ``splice`` (and what ``torchrun -m splice`` runs)."""

from splice.cli import entry

raise SystemExit(entry())
