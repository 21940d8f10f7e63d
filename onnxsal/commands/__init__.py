"""The ``onnxsal`` subcommands, one module per group of them: :mod:`~onnxsal.commands.model`
(inspect, augment, convert, train-autoencoder), :mod:`~onnxsal.commands.explain`,
:mod:`~onnxsal.commands.runs` (benchmark, evaluate, sanity, audit: the commands on an
executor) and :mod:`~onnxsal.commands.compare`; :mod:`~onnxsal.commands.common` holds what they
share. :func:`register` puts them all on the click group of :mod:`onnxsal.cli`.
"""

from __future__ import annotations

import click

from .compare import compare
from .explain import explain
from .model import augment, convert, inspect, train_autoencoder
from .runs import audit, benchmark, evaluate, sanity

COMMANDS: tuple[click.Command, ...] = (inspect, augment, explain, benchmark, evaluate, sanity, audit,
                                       convert, train_autoencoder, compare)


def register(group: click.Group) -> None:
    """Add every subcommand to ``group`` (the ``onnxsal`` group)."""
    for command in COMMANDS:
        group.add_command(command)
