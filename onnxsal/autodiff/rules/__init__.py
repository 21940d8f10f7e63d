"""The backward rules, one family of operators per module; importing the package registers
every built-in rule, so the default table is complete from the start (see :mod:`.registry`).

Families: :mod:`.elementwise`, :mod:`.linalg`, :mod:`.conv_pool`, :mod:`.norm`,
:mod:`.shape`, :mod:`.resize`, :mod:`.quant`, :mod:`.branches` (If); :mod:`.modified` holds
the ``guided`` and ``lrp`` overrides; shared helpers are in :mod:`.common`.
"""

from . import branches, conv_pool, elementwise, linalg, modified, norm, quant, resize, shape  # noqa: F401  (registration)
from .registry import DEFAULT, Rule, packaged, rule, ruleset_names, supported_ops, table

__all__ = ["DEFAULT", "Rule", "packaged", "rule", "ruleset_names", "supported_ops", "table"]
