"""The ``onnxsal`` command: a thin click layer over the packages; no logic of its own.

Errors a user can cause (:class:`onnxsal.errors.OnnxsalError`) print one line and exit with
status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import click

from .display import printable
from .errors import OnnxsalError

_DEBUG = {"on": False}


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


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--output", default=None, help="The output to explain when the model has several.")
def inspect(model: str, as_json: bool, output: str | None) -> None:
    """Print a model's input, logits, opset, parameters and operators."""
    from .inspect import summarize
    from .model import load_model

    s = summarize(load_model(model), path=model, output=output)
    if as_json:
        _echo(json.dumps(s.to_dict(), indent=2), block=True)
        return
    _echo(f"model       {model}")
    _echo(f"producer    {s.producer or '-'}")
    _echo(f"opset       {s.opset}   IR version {s.ir_version}")
    _echo(f"parameters  {s.parameters:,}")
    _echo(f"input       {s.input.name}  shape {s.input.shape}  layout {s.input.layout}")
    _echo(f"logits      {s.logits.tensor}  (output {s.logits.output}, "
               f"{s.logits.num_classes or '?'} classes)")
    _echo(f"gradients   {s.gradients}")
    for note in ([s.logits.note] if s.logits.note else []) + s.notes:
        _echo(f"note        {note}")
    bad = [op for op, v in s.operators.items() if v["needs_rule"] and not v["differentiable"]]
    _echo(f"operators   {sum(v['count'] for v in s.operators.values())} nodes, "
               f"{len(s.operators)} types ({len(bad)} without a gradient rule)")
    _echo(f"  {'operator':<24}{'nodes':>6}  gradient")
    for op, v in s.operators.items():
        grad = "yes" if v["differentiable"] else ("none flows" if not v["needs_rule"] else "NO (no rule)")
        _echo(f"  {op:<24}{v['count']:>6}  {grad}")


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--out", "out", required=True, type=click.Path(dir_okay=False),
              help="Where to write the augmented model.")
@click.option("--wrt", multiple=True, help="Tensor to differentiate with respect to "
              "(repeatable; default: the image input).")
@click.option("--rules", default="default", show_default=True,
              help="Rule set of the backward pass: default, or one that a method or plugin registers "
              "(an unknown name lists them).")
@click.option("--epsilon", type=FiniteFloat(min=0), default=None, help="Epsilon of the lrp rule set.")
@click.option("--output", default=None, help="The output to explain when the model has several.")
@click.option("--simplify/--no-simplify", default=True, show_default=True,
              help="Apply onnxruntime's basic graph optimizations first (fewer, cheaper backward nodes).")
@click.option("--size", default=None, metavar="HxW", help="Fix the image input's height and width "
              "(a model with dynamic sizes then gets a gradient graph for that size only).")
def augment(model: str, out: str, wrt: tuple[str, ...], rules: str, epsilon: float | None,
            output: str | None, simplify: bool, size: str | None) -> None:
    """Add the backward graph: one run returns logits and the gradient of every class."""
    from .autodiff import augment as augment_model
    from .autodiff.rules.registry import table
    from .model import find_image_input, find_logits, load_model, save_model, with_image_size
    from .preprocess import parse_size
    from .trust import without_own_gradient

    table(rules)  # an unknown rule set is refused before any work
    t0 = time.perf_counter()
    # a gradient graph of the file's own is replaced, not stacked under the new one
    m = without_own_gradient(load_model(model), output)
    logits = find_logits(m, output)
    options = {"epsilon": epsilon} if epsilon is not None else {}
    find_image_input(m)  # a model with no float image input is refused before anything runs
    if size is not None:
        m = with_image_size(m, parse_size(size, "--size"))
    if simplify:
        from .simplify import simplify as simplify_model

        m = simplify_model(m, keep=[logits.tensor, *wrt])
    aug = augment_model(m, wrt=list(wrt) or None, rules=rules, logits=logits.tensor, options=options)
    save_model(aug, out)
    dt = time.perf_counter() - t0
    if logits.note:
        _echo(f"note: {logits.note}", err=True)
    added = len(aug.graph.node) - len(m.graph.node)
    _echo(f"wrote {out}: {added} backward nodes, seed input "
               f"'{_meta(aug, 'onnxsal.seed')}' [K, N, C], in {dt:.2f} s")


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("images", nargs=-1, required=True)
@click.option("-m", "--method", "methods", multiple=True, default=["all"], show_default=True,
              help="Method name (repeatable, comma lists allowed), or 'all'.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--target", type=click.IntRange(min=0), default=None, help="Class to explain (default: predicted).")
@click.option("--preprocess", default=None, help="Model preprocessing: a preset (imagenet, "
              "imagenet255, tf, caffe, lite, x255) or 'scale=255 mean=.. std=.. bgr nhwc'.")
@click.option("--labels", "labels_file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Class names: JSON list or one per line.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--output", default=None, help="The output to explain when the model has several.")
@click.option("--layer", default=None, help="Grad-CAM layer (tensor name; default: found).")
@click.option("--limit", type=COUNT, default=None, help="At most this many images per source.")
@click.option("--gradients", type=click.Choice(["auto", "rebuild", "file"]), default="auto",
              show_default=True, help="For a file with its own gradient graph: rebuild it with "
              "onnxsal's pass (auto: unless the pass cannot), or use the file's after a check.")
@click.option("--set", "settings", multiple=True, metavar="METHOD.OPTION=VALUE",
              help="A method option, e.g. lore.generations=5 or anchor.segmentation=slic "
              "(repeatable; VALUE is read as JSON, else as text).")
def explain(model, images, methods, out, target, preprocess, labels_file, device, output, layer, limit,
            gradients, settings):
    """Saliency maps of MODEL for IMAGES (files, folders, .npz or built-in data names)."""
    from .explain import engine_for_images, run_explain
    from .preprocess import read_labels
    from .report import check_output_dir

    check_output_dir(out)  # before the model is read: minutes of work must have a place to go
    set_opts = method_settings(settings)
    eng, inputs = engine_for_images(model, images, limit, preprocess=preprocess, device=device,
                                    output=output, gradients=gradients)
    names = [m.strip() for spec in methods for m in spec.split(",") if m.strip()]
    labels = read_labels(labels_file) if labels_file else None
    opts = {"gradcam": {"layer": layer}} if layer else {}
    for name, values in set_opts.items():
        opts.setdefault(name, {}).update(values)
    if eng.logits_spec.note:
        _echo(f"note: {eng.logits_spec.note}", err=True)
    res = run_explain(eng, inputs, names, out, targets=target, labels=labels, limit=limit, options=opts)
    for note in res.notes:
        _echo(f"note: {note}", err=True)
    for f in res.failures:
        _echo(f"failed: {f['image']}: {f['error']}", err=True)
    _echo(f"{res.images} images x {len(res.methods)} methods on {eng.provider} in "
               f"{res.seconds:.1f} s ({res.per_image_seconds:.2f} s/image); wrote {out}/")


def method_settings(settings) -> dict:
    """{method: {option: value}} from ``METHOD.OPTION=VALUE`` strings (VALUE as JSON, else text);
    a malformed one is an OptionError line."""
    from .errors import OptionError

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
    ]):
        f = opt(f)
    return f


def _make_executor(executor, address, workers, cpus_per_worker, gpus_per_worker):
    from .executors import make_executor

    return make_executor(executor, address=address, workers=workers,
                         cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker)


@cli.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--data", "data", multiple=True, required=True,
              help="A folder (one subfolder per class), an .npz (x, y), image files "
              "(repeatable), or fashion-mnist[:train|test], digits, skimage-samples.")
@click.option("-m", "--methods", "methods", multiple=True,
              default=["original,positive,negative,active,inactive"], show_default=True,
              help="Method names (repeatable, comma lists allowed), or 'all'.")
@click.option("--metric", type=click.Choice(["accuracy", "allegiance"]), default="accuracy",
              show_default=True, help="Top-1 accuracy against labels, or agreement with the "
              "clean prediction (needs no labels).")
@click.option("--limit", type=COUNT, default=None, help="Use the first N images.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder "
              "(results.json, results.md, curves.csv, curves.png; shards/ for resuming).")
@click.option("--preprocess", default=None, help="Model preprocessing (as for explain).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of seeded methods.")
@click.option("--output", default=None, help="The output to explain when the model has several.")
@click.option("--shard-size", type=COUNT, default=256, show_default=True,
              help="Images per shard (the unit of resuming).")
@click.option("--threads", type=THREADS, default=None, help="onnxruntime threads per session.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--rise", is_flag=True, help="Also RISE deletion and insertion (docs/definitions.md#rise-metrics).")
@click.option("--rise-baseline", type=click.Choice(["black", "white", "mean", "blur"]),
              default="black", show_default=True, help="What RISE deletion puts in.")
@click.option("--rise-step", type=COUNT, default=None,
              help="Pixels per RISE step (default: one image row).")
@click.option("--add-metric", "add_metrics", multiple=True, metavar="NAME",
              help="Also a registered metric (repeatable, comma lists allowed; a --plugin "
              "module may register its own, docs/extending.md).")
@_executor_options
def benchmark(models, data, methods, metric, limit, out, preprocess, device, seed, output,
              shard_size, threads, quiet, rise, rise_baseline, rise_step, add_metrics, executor,
              address, workers, cpus_per_worker, gpus_per_worker):
    """Black/white-deletion AUCs of saliency METHODS on MODELS (docs/definitions.md#deletion)."""
    import shlex

    from .benchmark import run_benchmark

    ex = _make_executor(executor, address, workers, cpus_per_worker, gpus_per_worker)
    command = None
    if Path(sys.argv[0]).name == "onnxsal":
        command = " ".join(["onnxsal"] + [shlex.quote(a) for a in sys.argv[1:]])
    try:
        res = run_benchmark(list(models), data[0] if len(data) == 1 else list(data),
                            list(methods), metric, limit, out, preprocess=preprocess,
                            device=device, seed=seed, output=output, shard_size=shard_size,
                            threads=threads, progress=not quiet, command=command, rise=rise,
                            rise_baseline=rise_baseline, rise_step=rise_step,
                            metrics_extra=add_metrics, executor=ex)
    except KeyboardInterrupt:
        _echo(f"interrupted: finished shards are kept in {out}/shards; run the same "
                   "command again to resume", err=True)
        raise
    for note in res["data"]["notes"]:
        _echo(f"note: {note}", err=True)
    for f in res["data"]["failures"] + res.get("figure_failures", []):
        _echo(f"failed: {f['name']}: {f['error']}", err=True)
    nfail = sum(len(r["failures"]) for r in res["results"])
    if nfail:
        _echo(f"note: {nfail} per-image failures (listed in {out}/results.md)", err=True)
    from .report import deletion_table, metrics_table, rise_table

    _echo(deletion_table(res), nl=False, block=True)
    if rise:
        _echo(rise_table(res), nl=False, block=True)
    if metrics_table(res):
        _echo(metrics_table(res), nl=False, block=True)
    _echo(f"wrote {out}/results.json, results.md, curves.csv, curves.png "
               f"({res['data']['count']} images, {res['timing']['seconds_this_run']:.1f} s)")


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", "data", multiple=True, required=True,
              help="A folder (one subfolder per class), an .npz (x, y), image files "
              "(repeatable), or fashion-mnist[:train|test], digits, skimage-samples.")
@click.option("-m", "--methods", "methods", multiple=True, help="onnxsal method names "
              "(repeatable, comma lists allowed), or 'all'; with --maps: the keys of the file "
              "to score (default: all of them).")
@click.option("--metrics", "metric_names", multiple=True, required=True, metavar="NAME",
              help="Registered metric names (repeatable, comma lists allowed), or 'all': every "
              "metric that applies; one that cannot (no --masks for a localisation metric, no "
              "way to re-explain for maps from --maps, no labels) is skipped with its reason.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder "
              "(scores.json, scores.md, plots/; shards/ for resuming).")
@click.option("--maps", "maps_file", type=click.Path(dir_okay=False), default=None,
              help="Score maps made elsewhere: an .npz with one array per method, [N, H, W] or "
              "[N, C, H, W], in the data's order. Channels are reduced as onnxsal reduces its "
              "own maps of that method: summed for signed methods and for names onnxsal does "
              "not know, the maximum of the absolute value for magnitude maps (original, "
              "positive, ...).")
@click.option("--masks", default=None, metavar="MASKS", help="Ground-truth masks for the "
              "localisation metrics: a folder of mask images named like the images, FILE.npz "
              "or FILE.npz:KEY ([N, H, W], the data's order), or a CSV of boxes "
              "name,x0,y0,x1,y1.")
@click.option("--limit", type=COUNT, default=None, help="Use the first N images.")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Seed of seeded methods and metrics, and of the bootstrap.")
@click.option("--bootstrap", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Bootstrap resamples of the images for the 95%% interval of each mean "
              "(0: none).")
@click.option("--deletion-metric", type=click.Choice(["accuracy", "allegiance"]),
              default="accuracy", show_default=True, help="The score of black-white-deletion "
              "(accuracy needs labels).")
@click.option("--shard-size", type=COUNT, default=64, show_default=True,
              help="Images per shard (the unit of resuming).")
@click.option("--preprocess", default=None, help="Model preprocessing (as for explain).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--output", default=None, help="The output to explain when the model has several.")
@click.option("--threads", type=THREADS, default=None, help="onnxruntime threads per session.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_executor_options
def evaluate(model, data, methods, metric_names, out, maps_file, masks, limit, seed, bootstrap,
             deletion_metric, shard_size, preprocess, device, output, threads, quiet, executor,
             address, workers, cpus_per_worker, gpus_per_worker):
    """Score saliency maps of MODEL with the registered metrics: per-image scores, means with
    bootstrap confidence intervals, a table and plots. The maps come from onnxsal's METHODS or
    from --maps (maps made by any other tool). Resumable: run the same command again."""
    import shlex

    from .evaluate import run_evaluate, scores_table

    ex = _make_executor(executor, address, workers, cpus_per_worker, gpus_per_worker)
    command = None
    if Path(sys.argv[0]).name == "onnxsal":
        command = " ".join(["onnxsal"] + [shlex.quote(a) for a in sys.argv[1:]])
    try:
        res = run_evaluate(model, data[0] if len(data) == 1 else list(data), list(methods),
                           list(metric_names), out, maps=maps_file, masks=masks, limit=limit,
                           seed=seed, preprocess=preprocess, device=device, threads=threads,
                           output=output, shard_size=shard_size, executor=ex,
                           bootstrap=bootstrap, deletion_metric=deletion_metric,
                           progress=not quiet, command=command)
    except KeyboardInterrupt:
        _echo(f"interrupted: finished parts are kept in {out}/shards; run the same command "
              "again to resume", err=True)
        raise
    for note in res["data"]["notes"]:
        _echo(f"note: {note}", err=True)
    for f in res["data"]["failures"] + res.get("figure_failures", []):
        _echo(f"failed: {f['name']}: {f['error']}", err=True)
    for s in res["skipped"]:
        _echo(f"skipped: {s['metric']}: {s['reason']}", err=True)
    _echo(scores_table(res), nl=False, block=True)
    _echo(f"wrote {out}/scores.json, scores.md, plots/ ({res['data']['count']} images, "
          f"{len(res['settings']['methods'])} methods, {len(res['scores'])} scores, "
          f"{res['timing']['seconds_this_run']:.1f} s)")


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", "data", required=True,
              help="A folder, an .npz (x, y), an image file, or fashion-mnist[:train|test], "
              "digits, skimage-samples.")
@click.option("-m", "--methods", "methods", multiple=True,
              default=["vanilla,original,gradient_x_input,guided_backprop,gradcam,smoothgrad"],
              show_default=True, help="Method names (repeatable, comma lists allowed), or 'all'.")
@click.option("--mode", type=click.Choice(["cascading", "independent"]), default="cascading",
              show_default=True, help="Randomise layers top-down cumulatively, or one at a time.")
@click.option("--limit", type=COUNT, default=16, show_default=True, help="Use the first N images.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder "
              "(sanity.json, sanity.md, <mode>.png, maps_grid.png; steps/ for resuming).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the re-initialisation.")
@click.option("--max-steps", type=COUNT, default=None,
              help="At most this many randomisation steps, spread over the layers (default: all).")
@click.option("--threshold", type=FiniteFloat(), default=0.5, show_default=True,
              help="Pass rule: final mean Spearman(abs) similarity must fall below this.")
@click.option("--margin", type=FiniteFloat(), default=0.3, show_default=True,
              help="Pass rule: ... and at least this far below the self-similarity.")
@click.option("--step-margin", type=FiniteFloat(), default=0.02, show_default=True,
              help="Per-step rule: a step's mean Spearman(abs) must fall at least this far "
                   "below the self-similarity (and significantly, one-sided Wilcoxon).")
@click.option("--top-steps", type=COUNT, default=1, show_default=True,
              help="Top-layer verdict: the similarity must drop at each of the first N steps.")
@click.option("--hog-correlation", type=click.Choice(["pearson", "spearman"]), default="pearson",
              show_default=True, help="Correlation of the HOG vectors.")
@click.option("--grid-image", type=click.IntRange(min=0), default=0, show_default=True,
              help="Index of the image shown in maps_grid.png.")
@click.option("--preprocess", default=None, help="Model preprocessing (as for explain).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--output", default=None, help="The output to explain when the model has several.")
@click.option("--threads", type=THREADS, default=None, help="onnxruntime threads per session.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
@_executor_options
def sanity(model, data, methods, mode, limit, out, seed, max_steps, threshold, margin,
           step_margin, top_steps, hog_correlation, grid_image, preprocess, device, output, threads, quiet, executor,
           address, workers, cpus_per_worker, gpus_per_worker):
    """Model-parameter randomisation test of Adebayo et al. (docs/definitions.md#sanity-checks): do the METHODS'
    maps change when MODEL's learned weights are re-initialised?"""
    from .sanity_run import run_sanity

    ex = _make_executor(executor, address, workers, cpus_per_worker, gpus_per_worker)
    names = [m.strip() for spec in methods for m in spec.split(",") if m.strip()]
    say = None if quiet else (lambda s: _echo(s, err=True))
    try:
        rep = run_sanity(model, data, names, out, mode=mode, seed=seed, preprocess=preprocess,
                         device=device, threads=threads, output=output, max_steps=max_steps,
                         threshold=threshold, margin=margin, step_margin=step_margin,
                         top_steps=top_steps, hog_correlation=hog_correlation,
                         grid_image=grid_image, limit=limit, progress=say, executor=ex)
    except KeyboardInterrupt:
        _echo(f"interrupted: finished steps are kept in {out}/steps; run the same command "
                   "again to resume", err=True)
        raise
    for note in (rep.get("data") or {}).get("notes", []):
        _echo(f"note: {note}", err=True)
    for f in rep.get("figure_failures", []):
        _echo(f"failed: {f['name']}: {f['error']}", err=True)
    for m, v in rep["verdicts"].items():
        word = {True: "pass", False: "FAIL", None: "undecided"}[v["passes"]]
        _echo(f"{m:<24}{word:<10}{v['reason']}")
    for m, v in rep["step_verdicts"].items():
        word = {True: "pass", False: "FAIL", None: "undecided"}[v["passes"]]
        _echo(f"{m:<24}{word:<10}top layer(s): {v['reason']}")
    _echo(f"wrote {out}/sanity.json, sanity.md, {mode}.png, maps_grid.png "
               f"({rep['images']} images, {len(rep['steps']) - 1} steps)")


@cli.command()
@click.argument("framework", type=click.Choice(["torch", "keras", "jax"]))
@click.argument("source")
@click.option("-o", "--out", "out", required=True, type=click.Path(dir_okay=False),
              help="Where to write the ONNX model.")
@click.option("--opset", type=COUNT, default=None,
              help="ONNX opset (default: torch 17 (18 with --dynamo), keras 17 (max 18), jax 23 (min 18)).")
@click.option("--dynamo", is_flag=True, help="torch: use the torch.export-based exporter.")
@click.option("--input-shape", default=None, help="C,H,W of the model input (required for torch "
              "and jax; keras reads it from the model).")
@click.option("--weights", default=None, type=click.Path(dir_okay=False),
              help="torch: a state-dict file for the module SOURCE builds "
              "(read with torch.load(weights_only=True)).")
@click.option("--preprocess", default=None, help="What the model expects of [0,1] pixels, "
              "recorded in the file: a preset (imagenet, tf, caffe, lite, x255, ...) or "
              "'scale=255 mean=.. std=.. bgr'.")
@click.option("--labels", "labels_file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Class names to record: JSON list or one per line.")
@click.option("--no-parity", is_flag=True, help="Skip the comparison with the framework.")
def convert(framework, source, out, opset, dynamo, input_shape, weights, preprocess, labels_file,
            no_parity):
    """Export a PyTorch, Keras/TensorFlow or JAX classifier to ONNX, with its preprocessing and
    class names recorded, and compare the file with the framework on random inputs.

    SOURCE: for torch, 'module:function' returning the nn.Module (a weights file goes to
    --weights: torch files are only read with torch.load(weights_only=True), so they cannot
    carry the architecture); for keras, a .keras/.h5 file (loaded in Keras's safe mode) or
    'module:function'; for jax, 'module:function' returning fn(x), (apply_fn, params) or an nnx
    module (x is N,H,W,C). The module is imported from the current folder or PYTHONPATH.
    """
    from converters.common import quiet_frameworks
    from converters.convert import convert as run_convert

    from .errors import OptionError

    shape = None
    if input_shape:
        try:
            shape = tuple(int(v) for v in input_shape.replace("x", ",").split(",") if v.strip())
        except ValueError:
            raise OptionError(f"--input-shape {input_shape!r}: expected C,H,W") from None
        if len(shape) != 3:
            raise OptionError(f"--input-shape {input_shape!r}: expected C,H,W")
    t0 = time.perf_counter()
    with quiet_frameworks():
        res = run_convert(framework, source, out, opset=opset, dynamo=dynamo, input_shape=shape,
                          preprocess=preprocess, labels=labels_file, weights=weights,
                          check_parity=not no_parity)
    dt = time.perf_counter() - t0
    c, h, w = res.input_shape
    _echo(f"wrote {out}: {framework}, opset {res.opset}, input [N,{c},{h},{w}] "
               f"({res.layout} in the file), in {dt:.1f} s")
    if res.parity:
        p = res.parity
        _echo(f"parity vs {framework} on {p['n']} random inputs: max abs logit diff "
                   f"{p['max_abs_logit_diff']:.2e}, top-1 agreement {p['argmax_agreement']:.0%}")


@cli.command()
@click.argument("model_a", type=click.Path(dir_okay=False))
@click.argument("model_b", type=click.Path(dir_okay=False))
@click.option("--data", "data", required=True,
              help="A folder, an .npz (x, y), an image file, or fashion-mnist[:train|test], "
              "digits, skimage-samples.")
@click.option("-m", "--methods", "methods", multiple=True,
              default=["vanilla,gradient_x_input,integrated_gradients,gradcam,original"],
              show_default=True, help="Method names (repeatable, comma lists allowed), 'all', "
              "or 'none' for predictions only.")
@click.option("--limit", type=COUNT, default=32, show_default=True, help="Use the first N images.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output folder (compare.json, compare.md).")
@click.option("--preprocess-a", default=None, help="Preprocessing of MODEL_A (as for explain; "
              "default: recorded in the file).")
@click.option("--preprocess-b", default=None, help="Preprocessing of MODEL_B.")
@click.option("--atol", type=FiniteFloat(min=0), default=1e-4, show_default=True,
              help="Logit tolerance (absolute part) of the 'same model' verdict.")
@click.option("--rtol", type=FiniteFloat(min=0), default=1e-4, show_default=True,
              help="Logit tolerance relative to A's logit range.")
@click.option("--min-spearman", type=FiniteFloat(-1, 1), default=0.99, show_default=True,
              help="Smallest per-image map Spearman still called 'the same'.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of seeded methods.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--threads", type=THREADS, default=None, help="onnxruntime threads per session.")
def compare(model_a, model_b, data, methods, limit, out, preprocess_a, preprocess_b, atol, rtol,
            min_spearman, seed, device, threads):
    """Are MODEL_A and MODEL_B the same model, and where do they differ? Prediction agreement
    and, per saliency method, map agreement (Spearman, SSIM, max abs difference) on DATA."""
    from .compare import compare_models, markdown

    names = [m.strip() for spec in methods for m in spec.split(",") if m.strip()]
    if [n.lower() for n in names] == ["none"]:
        names = []
    rep = compare_models(model_a, model_b, data, names, limit=limit, out=out,
                         preprocess_a=preprocess_a, preprocess_b=preprocess_b, device=device,
                         threads=threads, seed=seed, atol=atol, rtol=rtol,
                         min_spearman=min_spearman)
    for note in rep["data"]["notes"]:
        _echo(f"note: {note}", err=True)
    _echo(markdown(rep), nl=False, block=True)
    _echo(f"wrote {out}/compare.json, compare.md ({rep['data']['count']} images, "
               f"{rep['seconds']:.1f} s)")


def _meta(model, key: str) -> str:
    return next((p.value for p in model.metadata_props if p.key == key), "")


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
