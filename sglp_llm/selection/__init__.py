"""Deciding which blocks go: the registry of choosers (SGLP's groups and rules, the loss check and
its removal loss, the peers' criteria) and the stability of a choice. Importing the package
registers every chooser."""

from . import baselines, sglp  # noqa: F401  (register their choosers)
