"""What the command modules share: the option types (:class:`FiniteFloat`, ``SEED``,
``COUNT``, ``THREADS``), :func:`_echo` (printing text that may come from a file), the
``--set`` parser, the method and ABELE autoencoder checks, and the executor options of
the commands that run on an executor (:func:`_executor_options`, :func:`_make_executor`)."""

from __future__ import annotations

import json
import math

import click

from ..display import printable


class FiniteFloat(click.FloatRange):
    """A float option that refuses NaN and infinity: a range alone lets NaN through, since no
    comparison with NaN fails."""

    name = "float"

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv


SEED = click.IntRange(0, 2**32 - 1)  # what numpy's and onnxruntime's generators take
COUNT = click.IntRange(min=1)
THREADS = click.IntRange(1, 1024)


def _echo(message: object = "", err: bool = False, nl: bool = True, block: bool = False) -> None:
    """Print a line that may carry strings from a file (a producer name, a label, a node name):
    control characters are shown escaped, so a file cannot clear the screen or fake output;
    ``block`` keeps the line breaks of text onnxsal formats itself (tables)."""
    click.echo(printable(message, keep_newlines=block), err=err, nl=nl)


def method_settings(settings) -> dict:
    """{method: {option: value}} from ``METHOD.OPTION=VALUE`` strings (VALUE as JSON, else text);
    a malformed one is an OptionError line."""
    from ..errors import OptionError

    out: dict = {}
    for item in settings:
        head, eq, raw = str(item).partition("=")
        method, dot, option = head.strip().partition(".")
        if not (eq and dot and method and option.strip()):
            raise OptionError(f"--set takes METHOD.OPTION=VALUE (e.g. lore.generations=5), got {item!r}")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        out.setdefault(method, {})[option.strip()] = value
    return out


def _resolve_methods(names: list[str]) -> list[str]:
    from ..methods import resolve

    return resolve(names)


def _abele_autoencoder(names: list[str], path: str):
    """The checked autoencoder folder of --autoencoder (read before the model: a bad folder is
    one line before any work), refused when -m does not name abele."""
    from ..autoencoder import load_autoencoder
    from ..errors import OptionError

    if "abele" not in _resolve_methods(names):
        raise OptionError("--autoencoder is only used by ABELE: add -m abele")
    return load_autoencoder(path)


def _executor_options(f):
    """--executor, --address, --workers, --cpus-per-worker, --gpus-per-worker."""
    for opt in reversed([
        click.option("--executor", type=click.Choice(["local", "ray"]), default="local",
                     show_default=True, help="Who computes: this process, or Ray workers "
                     "(pip install 'onnxsal[ray]'); see README, Running on a Ray cluster."),
        click.option("--address", default=None, help="Ray cluster to use (host:port, or auto "
                     "for the one `ray start` runs here); default: start Ray for this run."),
        click.option("--workers", type=COUNT, default=None, help="Ray worker actors (default: "
                     "as many as the cluster's CPUs, or GPUs, allow)."),
        click.option("--cpus-per-worker", type=FiniteFloat(min=0, min_open=True), default=None,
                     help="CPUs per Ray worker [1]."),
        click.option("--gpus-per-worker", type=FiniteFloat(min=0), default=None, help="GPUs per Ray worker "
                     "[0; 1 with --device cuda]."),
        click.option("--data-on-workers/--data-from-driver", default=None, help="Ray workers read "
                     "their images from the data's path, or get them from the driver [workers read "
                     "when Ray runs on this machine; docs/data.md#streaming]."),
    ]):
        f = opt(f)
    return f


def _make_executor(executor, address, workers, cpus_per_worker, gpus_per_worker, data_on_workers=None):
    from ..executors import make_executor

    return make_executor(executor, address=address, workers=workers, cpus_per_worker=cpus_per_worker,
                         gpus_per_worker=gpus_per_worker, data_on_workers=data_on_workers)


def _meta(model, key: str) -> str:
    return next((p.value for p in model.metadata_props if p.key == key), "")
