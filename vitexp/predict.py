"""`python -m vitexp.predict <checkpoint or exported folder> <images> --out predictions.csv`: the top-k classes and
their probabilities for every image under a folder, in onnxruntime or torch. An exported folder (`model.onnx` and
`model.json`, from `python -m vitexp.export --format onnx`) is read without vitexp's training code."""

from __future__ import annotations

import argparse
import importlib
import io
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from torchvision import transforms

from vitexp import VitexpError, run_on_files
from vitexp.files import check_output, open_regular, printable, read_bytes, read_json, reason, write_csv
from vitexp.images import MAX_IMAGE_BYTES, UNREADABLE, open_image, to_mode

# The exported folder's files and the names of the ONNX model's input and output (vitexp.onnx_export writes them)
MODEL_FILE = "model.onnx"
CARD_FILE = "model.json"
CARD_FORMAT = "vitexp-onnx"
INPUT, OUTPUT = "images", "logits"
ENGINES = ("onnxruntime", "torch")
INTERPOLATIONS = {
    "bilinear": transforms.InterpolationMode.BILINEAR,
    "bicubic": transforms.InterpolationMode.BICUBIC,
    "nearest": transforms.InterpolationMode.NEAREST,
}
# An exported folder's bounds: the card's size, the model's (protobuf's own limit for one file), the image sides
# (input and the resize before the crop: 2048 is four times the largest input timm's ViTs take), the classes, and the
# elements any one tensor of the graph may hold (1 GiB of float32; a vitexp model's largest weight is a few million)
MAX_CARD_BYTES = 16 << 20
MAX_MODEL_BYTES = 2 << 30
MAX_SIDE = 2048
MAX_CLASSES = 1_000_000
MAX_ELEMENTS = 1 << 28
# What an engine is: a float32 batch (N, C, H, W) in, logits (N, classes) out
Engine = Callable[[np.ndarray], np.ndarray]


def read_card(folder: Path) -> dict[str, Any]:
    """`model.json` of an exported folder, parsed as data (`files.read_json`: a regular file, not a symlink, size and
    nesting bounded) and checked field by field."""
    try:
        card = read_json(folder / CARD_FILE, root=folder, max_bytes=MAX_CARD_BYTES)
    except (OSError, VitexpError) as e:
        why = reason(e, folder / CARD_FILE) if isinstance(e, VitexpError) else printable(e)
        raise VitexpError(
            f"cannot read {printable(folder / CARD_FILE)} ({why}); export the folder with "
            f"python -m vitexp.export <checkpoint> --format onnx --out {printable(folder)}"
        ) from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise VitexpError(f"{printable(folder / CARD_FILE)} is not a {CARD_FORMAT} card; export the folder again")
    check_card(card, str(folder / CARD_FILE))
    return card


def check_card(card: dict[str, Any], where: str) -> None:
    """Refuse, with one line, a card whose preprocessing or classes are not what vitexp writes."""
    size, mean, std, classes = card.get("input_size"), card.get("mean"), card.get("std"), card.get("classes")
    number = (int, float)
    problems = {
        "image_mode": card.get("image_mode") in ("L", "RGB"),
        "input_size": isinstance(size, list)
        and len(size) == 3
        and all(type(s) is int and 0 < s for s in size)
        and max(size) <= MAX_SIDE,
        "mean": isinstance(mean, list) and all(isinstance(m, number) and not isinstance(m, bool) for m in mean),
        "std": isinstance(std, list) and all(isinstance(s, number) and not isinstance(s, bool) and s > 0 for s in std),
        "interpolation": isinstance(card.get("interpolation"), str) and card["interpolation"] in INTERPOLATIONS,
        # at least 1/16: the resize before the crop stays within 16x the input size
        "crop_pct": isinstance(card.get("crop_pct"), number) and 1 / 16 <= card["crop_pct"] <= 1,
        "classes": isinstance(classes, list)
        and 0 < len(classes) <= MAX_CLASSES
        and all(isinstance(c, str) for c in classes),
    }
    bad = [key for key, ok in problems.items() if not ok]
    if not bad and math.floor(size[1] / card["crop_pct"]) > MAX_SIDE:
        bad = ["input_size / crop_pct (the resize before the crop)"]
    if not bad and not (len(mean) == len(std) == size[0] == {"L": 1, "RGB": 3}[card["image_mode"]]):
        bad = ["mean, std and input_size channels"]
    if bad:
        raise VitexpError(f"{printable(where)}: {', '.join(bad)} not as vitexp writes it; export the folder again")


def preprocess(card: dict[str, Any]) -> transforms.Compose:
    """The evaluation transform the card describes (timm's: resize the short side to size / crop_pct, center-crop
    size, normalise), built from torchvision alone."""
    size = card["input_size"][1]
    return transforms.Compose(
        [
            transforms.Resize(math.floor(size / card["crop_pct"]), INTERPOLATIONS[card["interpolation"]]),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize([float(m) for m in card["mean"]], [float(s) for s in card["std"]]),
        ]
    )


def require(module: str) -> Any:
    """`module` imported, or a one-line error naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise VitexpError(
            f"{module} is not installed; pip install 'vitexp[onnx]' (onnx, onnxscript, onnxruntime)"
        ) from None


def onnx_engine(model_bytes: bytes, card: dict[str, Any] | None = None) -> Engine:
    """An onnxruntime CPU session for a serialised ONNX model vitexp exported, as an engine; with a `card` (a handed-over
    folder), the model is checked first (`check_model`). Every batch's logits are checked to be (N, classes) floats,
    and a batch onnxruntime fails on is one line."""
    onnxruntime = require("onnxruntime")
    if card is not None:
        check_model(model_bytes, card)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: not its notes on the graph optimisations it applies
    try:
        runner = onnxruntime.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types; the first line says what it could not load
        raise VitexpError(f"onnxruntime cannot load the model ({printable(e, 160)}); export it again") from None
    classes = len(card["classes"]) if card is not None else runner.get_outputs()[0].shape[1]

    def run(x: np.ndarray) -> np.ndarray:
        try:
            logits = runner.run([OUTPUT], {INPUT: x})[0]
        except Exception as e:  # onnxruntime's own exception types
            raise VitexpError(f"onnxruntime failed on a batch ({printable(e, 160)}); export the model again") from None
        if not isinstance(logits, np.ndarray) or logits.dtype != np.float32 or logits.shape != (len(x), classes):
            raise VitexpError(
                f"{MODEL_FILE} returned {printable(getattr(logits, 'shape', type(logits)))} logits for {len(x)} "
                f"images, not ({len(x)}, {classes}) float32; export the folder again"
            )
        return logits

    return run


def check_model(model_bytes: bytes, card: dict[str, Any]) -> None:
    """Refuse, in one line and before onnxruntime sees it, a model that is not one vitexp exports for `card`: tensors
    stored outside the file (external data, which onnxruntime would read from the working folder), other than one
    float32 input `images` (N, C, H, W) and one float32 output `logits` (N, classes) as the card says, or a tensor
    whose inferred shape holds more than `MAX_ELEMENTS` (a graph that allocates without bound)."""
    onnx = require("onnx")
    try:
        proto = onnx.ModelProto.FromString(model_bytes)
    except Exception as e:  # protobuf's DecodeError
        raise VitexpError(f"{MODEL_FILE} is not an ONNX model ({printable(e, 120)}); export the folder again") from None
    external = [t.name for t in _tensors(proto) if t.data_location == onnx.TensorProto.EXTERNAL or t.external_data]
    if external:
        raise VitexpError(
            f"{MODEL_FILE} keeps tensor {printable(external[0], 80)} in an external file (ONNX external data); "
            f"predict reads a model from its own bytes only: export the folder again with python -m vitexp.export"
        )
    expected = {INPUT: [card["input_size"]], OUTPUT: [[len(card["classes"])]]}
    for role, values in (("input", proto.graph.input), ("output", proto.graph.output)):
        name = INPUT if role == "input" else OUTPUT
        shapes = [_shape(v, onnx) for v in values]
        if [v.name for v in values] != [name] or shapes[0] is None or shapes[0][1:] != expected[name][0]:
            found = ", ".join(
                f"{printable(v.name, 40)} {shape if shape is not None else '(not float32)'}"
                for v, shape in zip(values, shapes)
            )
            raise VitexpError(
                f"{MODEL_FILE}'s {role}s are [{found}], not one float32 {name!r} [N, "
                f"{', '.join(map(str, expected[name][0]))}] as {CARD_FILE} says; export the folder again"
            )
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception as e:  # onnx's InferenceError and ValidationError: a graph onnx itself cannot follow
        raise VitexpError(
            f"{MODEL_FILE}: onnx cannot infer its shapes ({printable(e, 120)}); export it again"
        ) from None
    for value in [*inferred.graph.value_info, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if math.prod(d.dim_value for d in dims if d.HasField("dim_value")) > MAX_ELEMENTS:
            raise VitexpError(
                f"{MODEL_FILE}: tensor {printable(value.name, 80)} would hold more than {MAX_ELEMENTS} elements; "
                f"refused (a model vitexp exports never does)"
            )


def _shape(value: Any, onnx: Any) -> list[int | str] | None:
    """A graph input's or output's dims (a dynamic one by its name, `?` when it has none), None when it is not a
    float32 tensor."""
    tensor = value.type.tensor_type
    if not value.type.HasField("tensor_type") or tensor.elem_type != onnx.TensorProto.FLOAT:
        return None
    return [d.dim_value if d.HasField("dim_value") else printable(d.dim_param or "?", 20) for d in tensor.shape.dim]


def _tensors(proto: Any) -> Iterator[Any]:
    """Every tensor a model holds: initializers, sparse ones, and node attributes, in its graph, every subgraph and
    every local function."""
    stack = [proto.graph, *proto.functions]
    while stack:
        graph = stack.pop()
        yield from getattr(graph, "initializer", [])
        for sparse in getattr(graph, "sparse_initializer", []):
            yield from (sparse.values, sparse.indices)
        for node in graph.node:
            for attribute in node.attribute:
                yield from [attribute.t] if attribute.HasField("t") else []
                yield from attribute.tensors
                single = [attribute.sparse_tensor] if attribute.HasField("sparse_tensor") else []
                for sparse in [*single, *attribute.sparse_tensors]:
                    yield from (sparse.values, sparse.indices)
                stack += [attribute.g] if attribute.HasField("g") else []
                stack += list(attribute.graphs)


def load_engine(source: Path, engine: str | None, data_root: Path | None) -> tuple[Engine, dict[str, Any], str]:
    """The engine, the card and the engine's name for an exported folder (onnxruntime) or a checkpoint (torch by
    default; onnxruntime exports it in memory first)."""
    if engine not in (None, *ENGINES):
        raise VitexpError(f"--engine {printable(engine)} is not one of {', '.join(ENGINES)}")
    if source.is_dir():
        if engine == "torch":
            raise VitexpError(f"{printable(source)} is an ONNX export; pass its checkpoint for --engine torch")
        card = read_card(source)
        try:
            model_bytes = read_bytes(source / MODEL_FILE, root=source, max_bytes=MAX_MODEL_BYTES)
        except OSError as e:
            raise VitexpError(f"cannot read {printable(source / MODEL_FILE)} ({e.strerror}); export it again") from None
        return onnx_engine(model_bytes, card), card, "onnxruntime"
    from vitexp.onnx_export import checkpoint_engine  # the checkpoint path needs torch and vitexp's models

    return checkpoint_engine(source, engine or "torch", data_root)


def image_files(folder: Path) -> tuple[list[Path], list[str]]:
    """Every file under `folder` (nested folders included, in sorted order) and the symlinks met, which are not
    followed."""
    if not folder.is_dir() or folder.is_symlink():
        raise VitexpError(f"{printable(folder)} is not a folder; pass the folder of images to predict")
    found, links = [], []
    for parent, dirs, names in os.walk(folder):
        dirs.sort()
        for name in [*sorted(names), *[d for d in dirs if Path(parent, d).is_symlink()]]:
            path = Path(parent, name)
            if path.is_symlink():
                links.append(f"{printable(path.relative_to(folder))} (a symbolic link, not followed)")
            else:
                found.append(path)
    return found, links


def read_image(path: Path, mode: str) -> Image.Image:
    """The image at `path` as 8-bit `mode`, opened without following a symlink; `UNREADABLE` when it fails."""
    with open_regular(path, max_bytes=MAX_IMAGE_BYTES) as f:
        image = open_image(io.BytesIO(f.read()))
        image.load()
    return to_mode(image, mode)


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The `k` most probable classes per row and their softmax probabilities, most probable first."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(probs, order, axis=1)


def predict(
    source: str | Path,
    images: str | Path,
    out: str | Path,
    *,
    topk: int = 5,
    engine: str | None = None,
    batch_size: int = 32,
    data_root: str | Path | None = None,
) -> tuple[int, list[str]]:
    """Write `out` (CSV: path, label, prob, label_2, prob_2, ...) for every readable image under `images`; the number
    of rows and the files skipped (unreadable or links), each with why."""
    if topk < 1 or batch_size < 1:
        raise VitexpError(f"--topk {topk} and --batch-size {batch_size} must be at least 1")
    out, folder = check_output(out), Path(images)  # before any work: a device, FIFO or folder is never replaced
    paths, skipped = image_files(folder)
    run, card, _ = load_engine(Path(source), engine, Path(data_root) if data_root is not None else None)
    k = min(topk, len(card["classes"]))
    transform, rows = preprocess(card), []
    for start in _progress(range(0, len(paths), batch_size), len(paths), batch_size):
        batch, names = [], []
        for path in paths[start : start + batch_size]:
            try:
                batch.append(transform(read_image(path, card["image_mode"])).numpy())
                names.append(path.relative_to(folder).as_posix())
            except (*UNREADABLE, VitexpError) as e:
                why = "not an image file PIL reads" if isinstance(e, UnidentifiedImageError) else printable(e, 120)
                skipped.append(f"{printable(path.relative_to(folder))} ({why})")
        if batch:
            order, probs = top_k(run(np.stack(batch).astype(np.float32)), k)
            rows += [_row(name, o, p, card["classes"]) for name, o, p in zip(names, order, probs)]
    header = ["path", "label", "prob", *(f for i in range(2, k + 1) for f in (f"label_{i}", f"prob_{i}"))]
    write_csv(out, header, rows)
    return len(rows), skipped


def _row(name: str, order: np.ndarray, probs: np.ndarray, classes: list[str]) -> list[str]:
    return [name, *(f for i, p in zip(order, probs) for f in (classes[int(i)], f"{p:.6f}"))]


def _progress(starts: range, total: int, batch_size: int) -> Any:
    """`starts`, with a progress bar in images on a terminal (none when stderr is redirected)."""
    from tqdm import tqdm

    bar = tqdm(total=total, unit="img", disable=None, file=sys.stderr, leave=False)
    for start in starts:
        yield start
        bar.update(min(batch_size, total - start))
    bar.close()


def main(argv: list[str] | None = None) -> None:
    """Console entry point (`python -m vitexp.predict`)."""
    parser = argparse.ArgumentParser(prog="python -m vitexp.predict", description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a vitexp checkpoint (best.pt) or a folder exported as ONNX")
    parser.add_argument("images", type=Path, help="the folder of images (any format, size and mode; nested folders)")
    parser.add_argument("--out", type=Path, default=Path("predictions.csv"), help="the CSV to write")
    parser.add_argument("--topk", type=int, default=5, help="classes per image (at most the model's classes)")
    parser.add_argument("--engine", choices=ENGINES, default=None, help="default: onnxruntime for a folder, else torch")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--data-root", type=Path, default=None, help="a checkpoint's data folder, for class names")
    args = parser.parse_args(argv)
    rows, skipped = run_on_files(
        lambda: predict(
            args.model,
            args.images,
            args.out,
            topk=args.topk,
            engine=args.engine,
            batch_size=args.batch_size,
            data_root=args.data_root,
        )
    )
    print(f"wrote {args.out}: {rows} images, top-{args.topk} classes; {len(skipped)} files skipped")


if __name__ == "__main__":
    main()
