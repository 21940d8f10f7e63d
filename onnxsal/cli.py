"""The ``onnxsal`` command: a thin click layer over the packages; no logic of its own.

Errors a user can cause (:class:`onnxsal.errors.OnnxsalError`) print one line and exit with
status 2; ``--debug`` shows the traceback instead.

This module holds the click group, :func:`main` (the console script) and its error handling;
the subcommands are in :mod:`onnxsal.commands`, registered on the group here.
"""

from __future__ import annotations

import sys

import click

from .commands import register
from .commands.common import (
    COUNT,
    SEED,
    THREADS,
    FiniteFloat,
    _abele_autoencoder,
    _echo,
    _executor_options,
    _make_executor,
    _meta,
    _resolve_methods,
    method_settings,
)
from .commands.compare import compare
from .commands.explain import explain
from .commands.model import augment, convert, inspect, train_autoencoder
from .commands.runs import audit, benchmark, evaluate, sanity
from .errors import OnnxsalError

__all__ = [
    "COUNT", "SEED", "THREADS", "FiniteFloat", "_abele_autoencoder", "_echo", "_executor_options",
    "_make_executor", "_meta", "_resolve_methods", "audit", "augment", "benchmark", "cli", "compare",
    "convert", "evaluate", "explain", "inspect", "main", "method_settings", "sanity", "train_autoencoder",
]

_DEBUG = {"on": False}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("--plugin", "plugins", multiple=True, metavar="MODULE", help="Import MODULE (a "
              "module name or a .py file; repeatable) first: the methods and rule sets it "
              "registers can be used (docs/extending.md).")
@click.version_option(package_name="onnxsal")
def cli(debug: bool, plugins: tuple[str, ...]) -> None:
    """Saliency maps for any ONNX image classifier, computed by onnxruntime."""
    _DEBUG["on"] = debug
    if plugins:
        from .plugins import load

        load(plugins)


register(cli)


def _run_quietly() -> None:
    """The command, without numpy's floating-point warnings: NaN and Inf are expected from
    hostile models and onnxsal reports them itself (per-image failure lines, verdicts, n/a)."""
    import warnings

    import numpy as np

    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        cli.main(standalone_mode=False)


def main() -> None:
    try:
        _run_quietly()
    except click.exceptions.Abort:
        _echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:  # a bad option value: one line, as every other error
        ctx = exc.ctx.command_path if exc.ctx is not None else "onnxsal"
        _echo(f"error: {' '.join(exc.format_message().split())} (see '{ctx} -h')", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except OnnxsalError as exc:
        if _DEBUG["on"]:
            raise
        # one line even when a hostile file puts line breaks into a name the message quotes
        _echo(f"error: {' '.join(str(exc).split())}", err=True)
        sys.exit(2)
    except MemoryError as exc:
        if _DEBUG["on"]:
            raise
        detail = " ".join(str(exc).split()) or "no detail"
        _echo(f"error: out of memory ({detail}); use fewer or smaller images (--limit), "
                   "or a model with a smaller input", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        _echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
