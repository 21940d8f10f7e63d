"""The backward rules, one family of operators per module; importing the package registers
every built-in rule, so the default table is complete from the start (see :mod:`.registry`).

Families: :mod:`.elementwise`, :mod:`.linalg`, :mod:`.conv_pool`, :mod:`.norm`,
:mod:`.shape`, :mod:`.resize`, :mod:`.quant`, :mod:`.branches` (If); :mod:`.modified` holds
the ``guided`` and ``lrp`` overrides; shared helpers are in :mod:`.common`. A new family is
one new module here, found by name.
"""

from ... import plugins
from .registry import DEFAULT, Rule, packaged, rule, ruleset_names, supported_ops, table

# registration: every module of this package, in name order (a new family is one new module)
plugins.discover(__name__, __path__)

__all__ = ["DEFAULT", "Rule", "packaged", "rule", "ruleset_names", "supported_ops", "table"]
