"""The commands that run on an executor (local or Ray, the shared ``--executor`` options),
resumable from their shards: ``benchmark``, ``evaluate``, ``sanity`` and ``audit``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .common import COUNT, SEED, THREADS, FiniteFloat, _echo, _executor_options, _make_executor


def _interrupted(out, what: str) -> None:
    _echo(f"interrupted: finished {what} are kept in {out}/shards; run the same command again "
          "to resume", err=True)


def _data_lines(res: dict) -> None:
    """A run's data notes and per-image failures (reading or figures), one line each."""
    for note in res["data"]["notes"]:
        _echo(f"note: {note}", err=True)
    for f in res["data"]["failures"] + res.get("figure_failures", []):
        _echo(f"failed: {f['name']}: {f['error']}", err=True)


@click.command()
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
              address, workers, cpus_per_worker, gpus_per_worker, data_on_workers):
    """Black/white-deletion AUCs of saliency METHODS on MODELS (docs/definitions.md#deletion)."""
    import shlex

    from ..benchmark import run_benchmark

    ex = _make_executor(executor, address, workers, cpus_per_worker, gpus_per_worker, data_on_workers)
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
        _interrupted(out, "shards")
        raise
    _data_lines(res)
    nfail = sum(len(r["failures"]) for r in res["results"])
    if nfail:
        _echo(f"note: {nfail} per-image failures (listed in {out}/results.md)", err=True)
    from ..report import deletion_table, metrics_table, rise_table

    _echo(deletion_table(res), nl=False, block=True)
    if rise:
        _echo(rise_table(res), nl=False, block=True)
    if metrics_table(res):
        _echo(metrics_table(res), nl=False, block=True)
    _echo(f"wrote {out}/results.json, results.md, curves.csv, curves.png "
               f"({res['data']['count']} images, {res['timing']['seconds_this_run']:.1f} s)")


@click.command()
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
             address, workers, cpus_per_worker, gpus_per_worker, data_on_workers):
    """Score saliency maps of MODEL with the registered metrics: per-image scores, means with
    bootstrap confidence intervals, a table and plots. The maps come from onnxsal's METHODS or
    from --maps (maps made by any other tool). Resumable: run the same command again."""
    import shlex

    from ..evaluate import run_evaluate, scores_table

    ex = _make_executor(executor, address, workers, cpus_per_worker, gpus_per_worker, data_on_workers)
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
        _interrupted(out, "parts")
        raise
    _data_lines(res)
    for s in res["skipped"]:
        _echo(f"skipped: {s['metric']}: {s['reason']}", err=True)
    _echo(scores_table(res), nl=False, block=True)
    _echo(f"wrote {out}/scores.json, scores.md, plots/ ({res['data']['count']} images, "
          f"{len(res['settings']['methods'])} methods, {len(res['scores'])} scores, "
          f"{res['timing']['seconds_this_run']:.1f} s)")


@click.command()
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
           address, workers, cpus_per_worker, gpus_per_worker, data_on_workers):
    """Model-parameter randomisation test of Adebayo et al. (docs/definitions.md#sanity-checks): do the METHODS'
    maps change when MODEL's learned weights are re-initialised?"""
    from ..sanity_run import run_sanity

    ex = _make_executor(executor, address, workers, cpus_per_worker, gpus_per_worker, data_on_workers)
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


@click.command()
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("--data", "data", default=None,
              help="A folder (one subfolder per class), an .npz (x, y), an image file, or "
              "fashion-mnist[:train|test], digits, skimage-samples.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output folder (report.html, audit.json, assets/, benchmark/, sanity/, parts/).")
@click.option("--masks", default=None, help="Ground-truth masks for the localisation metrics: a "
              "folder of mask images named like the images, an .npz, or a CSV of boxes "
              "name,x0,y0,x1,y1.")
@click.option("-m", "--methods", "methods", multiple=True,
              default=[",".join(("vanilla", "original", "gradient_x_input", "guided_backprop",
                                 "gradcam", "smoothgrad"))],
              show_default=True, help="Method names (repeatable, comma lists allowed), or 'all'.")
@click.option("--labels", "labels_file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Class names: JSON list or one per line (default: the model's, then the data's).")
@click.option("--per-class", type=COUNT, default=2, show_default=True,
              help="Images shown per class with their maps: this many correct and this many wrong.")
@click.option("--max-classes", type=COUNT, default=20, show_default=True,
              help="At most this many classes shown (those with the most errors).")
@click.option("--limit", type=COUNT, default=None, help="Use the first N images.")
@click.option("--eval-images", type=COUNT, default=32, show_default=True,
              help="Images (class-stratified) for deletion, the metrics and localisation.")
@click.option("--sanity-images", type=COUNT, default=8, show_default=True,
              help="Images (class-stratified) for the sanity checks.")
@click.option("--max-steps", type=COUNT, default=4, show_default=True,
              help="Randomisation steps of the sanity checks (spread over the layers).")
@click.option("--metric", "metric_names", multiple=True, metavar="NAME",
              help="Only these registered metrics (repeatable, comma lists; default: every one "
              "that applies).")
@click.option("--shortcut-images", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Images (class-stratified) for the shortcut search; 0: no search.")
@click.option("--shortcut-method", default=None, help="The method whose maps the shortcut search "
              "uses (default: vanilla if selected, else the first).")
@click.option("--review", "review_file", type=click.Path(dir_okay=False), default=None,
              help="Fold an expert review (the file the report's Download review button saves) "
              "into the report in --out; with MODEL and --data the audit is run (or resumed) first.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of seeded methods.")
@click.option("--preprocess", default=None, help="Model preprocessing (as for explain).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--output", default=None, help="The output to explain when the model has several.")
@click.option("--threads", type=THREADS, default=None, help="onnxruntime threads per session.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
@_executor_options
def audit(model, data, out, masks, methods, labels_file, per_class, max_classes, limit,
          eval_images, sanity_images, max_steps, metric_names, shortcut_images, shortcut_method,
          review_file, seed, preprocess, device, output, threads, quiet, executor, address,
          workers, cpus_per_worker, gpus_per_worker, **more_executor_options):
    """One report on MODEL (docs/audit.md): model facts, accuracy and confusion, maps per class,
    deletion and the metrics that apply, sanity checks, localisation (with --masks), shortcuts;
    OUT/report.html opens offline and has an expert review mode (--review folds it back)."""
    import shlex

    from ..audit import fold_review, run_audit
    from ..errors import OptionError

    if model is None or data is None:
        if review_file is None or (model is None) != (data is None):
            raise OptionError("give MODEL and --data (or only --review FILE with the --out of an audit)")
    else:
        # the executor options beyond these five (those _executor_options adds later) go on as given
        ex = _make_executor(executor, address, workers, cpus_per_worker, gpus_per_worker,
                            **more_executor_options)
        command = " ".join(["onnxsal"] + [shlex.quote(a) for a in sys.argv[1:]]) \
            if Path(sys.argv[0]).name == "onnxsal" else None
        wanted = [p.strip() for m in metric_names for p in m.split(",") if p.strip()] or None
        say = None if quiet else (lambda s: _echo(s, err=True))
        try:
            rep = run_audit(model, data, out, methods=list(methods), masks=masks, labels=labels_file,
                            per_class=per_class, max_classes=max_classes, limit=limit,
                            eval_images=eval_images, sanity_images=sanity_images,
                            max_steps=max_steps, metrics=wanted, shortcut_images=shortcut_images,
                            shortcut_method=shortcut_method, seed=seed, preprocess=preprocess,
                            device=device, threads=threads, output=output, executor=ex,
                            progress=say, command=command)
        except KeyboardInterrupt:
            _echo(f"interrupted: finished parts are kept in {out}/; run the same command again "
                  "to resume", err=True)
            raise
        for v in rep["summary"]["verdicts"]:
            _echo(f"{v['level']:<5} {v['topic']}: {v['text']}")
        _echo(f"wrote {out}/report.html, audit.json ({rep['data']['count']} images, "
              f"{rep['timing']['seconds']:.1f} s)")
    if review_file is not None:
        rv = fold_review(out, review_file)
        o = rv["overall"]
        rate = "n/a" if o["agreement"] is None else f"{100 * o['agreement']:.1f}%"
        _echo(f"review: {o['reviewed']} of {o['items']} maps reviewed, agreement {rate}; "
              f"wrote {out}/report.html")
