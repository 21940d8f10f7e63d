"""``onnxsal compare``: two ONNX files of one model, their predictions and maps."""

from __future__ import annotations

import click

from .common import COUNT, SEED, THREADS, FiniteFloat, _echo


@click.command()
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
    from ..compare import compare_models, markdown

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
