"""Train a small adversarial autoencoder (AAE) on a user's images and export it to ONNX, for
ABELE (``onnxsal explain -m abele --autoencoder DIR``; docs/abele.md).

The AAE (Makhzani et al. 2016, "Adversarial Autoencoders"; as ABELE uses it, Guidotti et al.
2019): a convolutional encoder maps an image to a latent code z (deterministic), a decoder
maps z back to an image in [0, 1] (sigmoid), and a small MLP discriminator on the latent space
learns to tell codes of real images from draws of the prior N(0, I). Each step (a) trains the
discriminator on encoded codes (label 0) and prior draws (label 1), then (b) trains encoder
and decoder on ``(1 - w) * MSE(x, dec(enc(x))) + w * BCE(disc(enc(x)), 1)``: reconstruction
plus the adversarial term that pulls the code distribution onto the prior (ABELE's code weighs
them 0.999 / 0.001; the default ``adv_weight`` here is 0.01 because the MSE is taken on
[0, 1] pixels, not [-1, 1]). Adam with betas (0.5, 0.999) as ABELE, but lr 1e-3 (ABELE:
2e-4) so that a CPU thread trains a usable AAE in minutes.

Output folder: ``encoder.onnx`` (image [N, C, H, W] -> z [N, L]), ``decoder.onnx`` (z [N, L]
-> image [N, C, H, W]), ``discriminator.onnx`` (z [N, L] -> probability of "from the prior"
[N, 1]) and ``autoencoder.json`` (format, latent size, input shape, value range, the
reconstruction error on held-out images, the discriminator's acceptance of held-out codes,
training settings, onnxsal version). The core reads the folder with
:mod:`onnxsal.autoencoder` (onnxruntime only). torch is imported lazily.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxsal.autoencoder import FORMAT
from onnxsal.errors import InputError, OptionError
from onnxsal.onnx_util import set_ir_version


def _modules(c: int, h: int, w: int, latent: int, width: int = 16, hidden: int = 128):
    """(encoder, decoder, discriminator) torch modules for [C, H, W] images."""
    import torch
    from torch import nn

    h2, w2 = math.ceil(h / 2), math.ceil(w / 2)
    h4, w4 = math.ceil(h2 / 2), math.ceil(w2 / 2)
    flat = 2 * width * h4 * w4

    encoder = nn.Sequential(
        nn.Conv2d(c, width, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
        nn.Flatten(), nn.Linear(flat, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, latent))

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Sequential(nn.Linear(latent, hidden), nn.LeakyReLU(0.2),
                                    nn.Linear(hidden, flat), nn.LeakyReLU(0.2))
            self.up1 = nn.Upsample(size=(h2, w2), mode="nearest")
            self.conv1 = nn.Conv2d(2 * width, width, 3, padding=1)
            self.up2 = nn.Upsample(size=(h, w), mode="nearest")
            self.conv2 = nn.Conv2d(width, width, 3, padding=1)
            self.out = nn.Conv2d(width, c, 3, padding=1)
            self.act = nn.LeakyReLU(0.2)

        def forward(self, z):
            t = self.fc(z).reshape(-1, 2 * width, h4, w4)
            t = self.act(self.conv1(self.up1(t)))
            t = self.act(self.conv2(self.up2(t)))
            return torch.sigmoid(self.out(t))

    discriminator = nn.Sequential(
        nn.Linear(latent, 128), nn.LeakyReLU(0.2), nn.Linear(128, 64), nn.LeakyReLU(0.2),
        nn.Linear(64, 1), nn.Sigmoid())
    return encoder, Decoder(), discriminator


def _export(module, example, path: Path, in_name: str, out_name: str) -> None:
    import torch

    f = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module.eval(), (example,), f, opset_version=17, input_names=[in_name],
                          output_names=[out_name], dynamo=False,
                          dynamic_axes={in_name: {0: "N"}, out_name: {0: "N"}})
    model = onnx.load_from_string(f.getvalue())
    set_ir_version(model)
    onnx.checker.check_model(model, full_check=True)
    from onnxsal.model import save_model

    save_model(model, str(path))


def train_autoencoder(x: np.ndarray, out: str | os.PathLike, latent: int = 4, epochs: int = 40,
                      seed: int = 0, batch_size: int = 128, adv_weight: float = 0.01,
                      lr: float = 1e-3, holdout: float = 0.1, threads: int = 1,
                      source: str = "", log=None, max_seconds: float | None = None) -> dict[str, Any]:
    """Train an AAE on images ``x`` (float32 [N, C, H, W] in [0, 1]) and write the folder
    ``out``; returns the ``autoencoder.json`` record. ``max_seconds``: stop after the epoch
    that passes this training time (recorded as ``epochs_run``)."""
    import torch
    from torch import nn

    from onnxsal import __version__

    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 4 or len(x) < 2:
        raise InputError(f"train-autoencoder needs at least 2 images [N, C, H, W], got {x.shape}")
    if not 2 <= int(latent) <= 64:
        raise OptionError(f"--latent {latent}: expected 2..64 (ABELE uses 4..16)")
    if int(epochs) < 1 or int(batch_size) < 1 or not 0 <= adv_weight < 1 or not 0 < holdout < 1:
        raise OptionError("epochs and batch size must be >= 1, 0 <= adv_weight < 1, 0 < holdout < 1")
    n, c, h, w = x.shape
    torch.set_num_threads(int(threads))
    torch.manual_seed(int(seed))
    rng = np.random.default_rng(int(seed))
    perm = rng.permutation(n)
    n_hold = max(1, int(round(n * holdout)))
    hold, train = x[perm[:n_hold]], x[perm[n_hold:]]
    if len(train) == 0:
        train = hold
    enc, dec, disc = _modules(c, h, w, int(latent))
    opt_ae = torch.optim.Adam(list(enc.parameters()) + list(dec.parameters()), lr=lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=lr, betas=(0.5, 0.999))
    bce, mse = nn.BCELoss(), nn.MSELoss()
    xt = torch.from_numpy(train)
    gen = torch.Generator().manual_seed(int(seed))
    t0 = time.perf_counter()
    history = []
    for ep in range(int(epochs)):
        order = torch.randperm(len(xt), generator=gen)
        tot_rec = tot_d = 0.0
        for s in range(0, len(xt), batch_size):
            xb = xt[order[s:s + batch_size]]
            m = len(xb)
            # (a) the discriminator: prior draws are "real" (1), codes of images "fake" (0)
            with torch.no_grad():
                z_fake = enc(xb)
            z_real = torch.randn(m, int(latent), generator=gen)
            d_in = torch.cat([z_real, z_fake])
            d_lab = torch.cat([torch.ones(m, 1), torch.zeros(m, 1)])
            opt_d.zero_grad()
            d_loss = bce(disc(d_in), d_lab)
            d_loss.backward()
            opt_d.step()
            # (b) encoder and decoder: reconstruct, and make the codes look like prior draws
            opt_ae.zero_grad()
            z = enc(xb)
            rec = mse(dec(z), xb)
            adv = bce(disc(z), torch.ones(m, 1))
            ((1 - adv_weight) * rec + adv_weight * adv).backward()
            opt_ae.step()
            tot_rec += float(rec.detach()) * m
            tot_d += float(d_loss.detach()) * m
        history.append({"epoch": ep + 1, "train_mse": tot_rec / len(xt), "disc_loss": tot_d / len(xt)})
        if log is not None:
            log(f"epoch {ep + 1}/{epochs}: train mse {tot_rec / len(xt):.5f}, "
                f"discriminator loss {tot_d / len(xt):.4f}, {time.perf_counter() - t0:.0f} s")
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            break
    seconds = time.perf_counter() - t0
    enc.eval(), dec.eval(), disc.eval()
    with torch.no_grad():
        ht = torch.from_numpy(hold)
        zh = enc(ht)
        rh = dec(zh)
        hold_mse = float(((rh - ht) ** 2).mean())
        hold_mae = float((rh - ht).abs().mean())
        accept = float((disc(zh) > 0.5).float().mean())
        prior_accept = float((disc(torch.randn(1000, int(latent), generator=gen)) > 0.5).float().mean())
        z_all = enc(torch.from_numpy(train)).numpy()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _export(enc, torch.from_numpy(x[:2]), out / "encoder.onnx", "image", "latent")
    _export(dec, torch.zeros(2, int(latent)), out / "decoder.onnx", "latent", "image")
    _export(disc, torch.zeros(2, int(latent)), out / "discriminator.onnx", "latent", "real")
    record = {
        "format": FORMAT, "latent": int(latent), "input_shape": [int(c), int(h), int(w)],
        "value_range": [0.0, 1.0],
        "files": {"encoder": "encoder.onnx", "decoder": "decoder.onnx",
                  "discriminator": "discriminator.onnx"},
        "prior": "standard normal",
        "latent_stats": {"mean": z_all.mean(0).round(4).tolist(), "std": z_all.std(0).round(4).tolist()},
        "heldout": {"images": int(len(hold)), "reconstruction_mse": round(hold_mse, 6),
                    "reconstruction_mae": round(hold_mae, 6),
                    "discriminator_accepts_codes": round(accept, 4),
                    "discriminator_accepts_prior": round(prior_accept, 4)},
        "training": {"source": source, "images": int(len(train)), "epochs": int(epochs),
                     "epochs_run": len(history), "max_seconds": max_seconds,
                     "batch_size": int(batch_size), "lr": lr, "betas": [0.5, 0.999],
                     "adv_weight": adv_weight, "seed": int(seed), "threads": int(threads),
                     "seconds": round(seconds, 1), "final_train_mse": round(history[-1]["train_mse"], 6)},
        "onnxsal_version": __version__,
    }
    (out / "autoencoder.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
