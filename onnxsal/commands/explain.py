"""``onnxsal explain``: saliency maps of images."""

from __future__ import annotations

import click

from .common import COUNT, _abele_autoencoder, _echo, _resolve_methods, method_settings


@click.command()
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
@click.option("--autoencoder", default=None, type=click.Path(), metavar="DIR",
              help="ABELE's adversarial autoencoder (-m abele; made by `onnxsal train-autoencoder`).")
def explain(model, images, methods, out, target, preprocess, labels_file, device, output, layer, limit,
            gradients, settings, autoencoder):
    """Saliency maps of MODEL for IMAGES (files, folders, .npz or built-in data names)."""
    from ..explain import engine_for_images, run_explain
    from ..preprocess import read_labels
    from ..report import check_output_dir

    check_output_dir(out)  # before the model is read: minutes of work must have a place to go
    names = [m.strip() for spec in methods for m in spec.split(",") if m.strip()]
    opts: dict = {"gradcam": {"layer": layer}} if layer else {}
    for name, values in method_settings(settings).items():
        opts.setdefault(name, {}).update(values)
    if autoencoder is not None:
        opts.setdefault("abele", {})["autoencoder"] = _abele_autoencoder(names, autoencoder)
    elif "abele" in _resolve_methods(names) and "autoencoder" not in opts.get("abele", {}):
        from ..errors import OptionError

        raise OptionError("-m abele needs an adversarial autoencoder: --autoencoder DIR (make one "
                          "with `onnxsal train-autoencoder`; docs/abele.md)")
    eng, inputs = engine_for_images(model, images, limit, preprocess=preprocess, device=device,
                                    output=output, gradients=gradients)
    labels = read_labels(labels_file) if labels_file else None
    if eng.logits_spec.note:
        _echo(f"note: {eng.logits_spec.note}", err=True)
    res = run_explain(eng, inputs, names, out, targets=target, labels=labels, limit=limit, options=opts)
    for note in res.notes:
        _echo(f"note: {note}", err=True)
    for f in res.failures:
        _echo(f"failed: {f['image']}: {f['error']}", err=True)
    _echo(f"{res.images} images x {len(res.methods)} methods on {eng.provider} in "
               f"{res.seconds:.1f} s ({res.per_image_seconds:.2f} s/image); wrote {out}/")
