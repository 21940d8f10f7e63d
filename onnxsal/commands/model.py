"""The commands about one model file: ``inspect``, ``augment`` (the gradient graph),
``convert`` (torch, keras, jax to ONNX) and ``train-autoencoder`` (ABELE's autoencoder)."""

from __future__ import annotations

import json
import time

import click

from .common import COUNT, SEED, THREADS, FiniteFloat, _echo, _meta


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--output", default=None, help="The output to explain when the model has several.")
def inspect(model: str, as_json: bool, output: str | None) -> None:
    """Print a model's input, logits, opset, parameters and operators."""
    from ..inspect import summarize
    from ..model import load_model

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


@click.command()
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
    from ..autodiff import augment as augment_model
    from ..autodiff.rules.registry import table
    from ..model import find_image_input, find_logits, load_model, save_model, with_image_size
    from ..preprocess import parse_size
    from ..trust import without_own_gradient

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
        from ..simplify import simplify as simplify_model

        m = simplify_model(m, keep=[logits.tensor, *wrt])
    aug = augment_model(m, wrt=list(wrt) or None, rules=rules, logits=logits.tensor, options=options)
    save_model(aug, out)
    dt = time.perf_counter() - t0
    if logits.note:
        _echo(f"note: {logits.note}", err=True)
    added = len(aug.graph.node) - len(m.graph.node)
    _echo(f"wrote {out}: {added} backward nodes, seed input "
               f"'{_meta(aug, 'onnxsal.seed')}' [K, N, C], in {dt:.2f} s")


@click.command()
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

    from ..errors import OptionError

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


@click.command("train-autoencoder")
@click.option("--data", "data", required=True, help="Training images: a folder, an .npz (x), "
              "image files, or fashion-mnist[:train|test], digits.")
@click.option("-o", "--out", "out", required=True, type=click.Path(file_okay=False),
              help="Output folder (encoder.onnx, decoder.onnx, discriminator.onnx, autoencoder.json).")
@click.option("--model", default=None, type=click.Path(dir_okay=False),
              help="The classifier to be explained: the images are brought to its input size.")
@click.option("--size", default=None, metavar="HxW", help="Image size (without --model; default: as read).")
@click.option("--channels", type=click.Choice(["1", "3"]), default=None,
              help="Image channels (without --model; default: as read).")
@click.option("--latent", type=click.IntRange(2, 64), default=4, show_default=True,
              help="Latent size (ABELE uses 4..16; 4..8 for small grey images).")
@click.option("--epochs", type=COUNT, default=40, show_default=True)
@click.option("--batch-size", type=COUNT, default=128, show_default=True)
@click.option("--adv-weight", type=FiniteFloat(0, 1, max_open=True), default=0.01, show_default=True,
              help="Weight of the adversarial (prior-matching) loss against the reconstruction.")
@click.option("--limit", type=COUNT, default=None, help="Use the first N images.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--threads", type=THREADS, default=1, show_default=True, help="torch threads.")
@click.option("--max-minutes", type=FiniteFloat(min=0, min_open=True), default=None,
              help="Stop after the epoch that passes this training time.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
def train_autoencoder(data, out, model, size, channels, latent, epochs, batch_size, adv_weight,
                      limit, seed, threads, max_minutes, quiet):
    """Train an adversarial autoencoder on DATA for ABELE (-m abele --autoencoder DIR) and
    export encoder, decoder and latent discriminator to ONNX (needs torch; docs/abele.md)."""
    from converters.autoencoder import train_autoencoder as train

    from ..data import load_dataset
    from ..errors import OptionError
    from ..preprocess import parse_size

    shape: list = [int(channels) if channels else None, None, None]
    if model is not None:
        if size or channels:
            raise OptionError("give --model or --size/--channels, not both")
        from ..engine import Engine

        shape = list(Engine(model, threads=1).input_shape)
    elif size:
        shape[1:] = list(parse_size(size, "--size"))
    ds = load_dataset(data, shape, limit=limit)
    for note in ds.notes:
        _echo(f"note: {note}", err=True)
    say = None if quiet else (lambda s: _echo(s, err=True))
    rec = train(ds.images, out, latent=latent, epochs=epochs, seed=seed, batch_size=batch_size,
                adv_weight=adv_weight, threads=threads, source=ds.source, log=say,
                max_seconds=None if max_minutes is None else 60 * max_minutes)
    held = rec["heldout"]
    _echo(f"wrote {out}/: latent {latent}, input {rec['input_shape']}, held-out reconstruction "
          f"MSE {held['reconstruction_mse']:.5f} on {held['images']} images, discriminator accepts "
          f"{held['discriminator_accepts_codes']:.0%} of their codes, {rec['training']['seconds']:.1f} s")
