"""Handed-over inputs built in a test: a tiny ONNX folder made with onnx.helper (one MatMul, as `vitexp.export`
lays it out), variants of it that are not what vitexp exports, and a guard that turns a hang into a failure."""

from __future__ import annotations

import contextlib
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

# 3x4x4 images, 2 classes: a model small enough to build in every case
SIZE, CLASSES = [3, 4, 4], ["cat", "dog"]
CARD = {
    "format": "vitexp-onnx",
    "image_mode": "RGB",
    "input_size": SIZE,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "interpolation": "bilinear",
    "crop_pct": 1.0,
    "classes": CLASSES,
}
# what a test names a model variant by: each is one thing vitexp's exports never are
VARIANTS = [
    "input_name",
    "output_name",
    "fp16",
    "second_input",
    "dynamic_width",
    "constant_of_shape",
    "external",
    "attribute_external",
]


def model(variant: str | None = None, classes: int = len(CLASSES)) -> Any:
    """The ONNX ModelProto: images (N, 3, 4, 4) -> Flatten -> MatMul -> logits (N, classes), or one `variant`."""
    from onnx import TensorProto, helper, numpy_helper

    features = int(np.prod(SIZE))
    weight = numpy_helper.from_array(np.linspace(-1, 1, features * classes, dtype=np.float32).reshape(-1, classes), "w")
    inputs = [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", *SIZE])]
    width: int | str = "W" if variant == "dynamic_width" else classes
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", width])]
    nodes = [helper.make_node("Flatten", ["images"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])]
    if variant == "input_name":
        inputs[0].name, nodes[0].input[0] = "x", "x"
    if variant == "output_name":
        outputs[0].name, nodes[1].output[0] = "y", "y"
    if variant == "fp16":
        inputs[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    if variant == "second_input":
        inputs.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, ["N", 1]))
    initializers = [weight]
    if variant == "constant_of_shape":  # 40e9 floats: 160 GB, allocated when onnxruntime folds constants
        initializers.append(numpy_helper.from_array(np.array([40_000_000_000], dtype=np.int64), "shape"))
        nodes += [helper.make_node("ConstantOfShape", ["shape"], ["big"]), helper.make_node("Shape", ["big"], ["n"])]
    if variant in ("external", "attribute_external"):
        external = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[features, classes])
        external.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "secret.bin"), ("offset", "0"), ("length", str(features * classes * 4))):
            external.external_data.add(key=key, value=value)
        if variant == "external":
            initializers = [external]
        else:
            initializers = []
            nodes.insert(0, helper.make_node("Constant", [], ["w"], value=external))
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def export_folder(folder: Path, variant: str | None = None, **card: Any) -> Path:
    """An exported folder (`model.onnx`, `model.json`) at `folder`: the honest one, or a `variant`, the card's fields
    replaced by `card`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(model(variant).SerializeToString())
    (folder / "model.json").write_text(json.dumps({**CARD, **card}))
    return folder


def images(folder: Path, names: list[str]) -> Path:
    """A folder of small PNGs named `names`."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (6, 5), (40 * i % 255, 90, 200)).save(folder / name, format="PNG")
    return folder


@contextlib.contextmanager
def no_hang(seconds: int = 20) -> Iterator[None]:
    """Fail (TimeoutError) instead of hanging when the body blocks longer than `seconds` (say, opening a FIFO)."""

    def expire(signum, frame):
        raise TimeoutError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
