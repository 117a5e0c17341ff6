"""`python -m vitexp.predict <checkpoint or exported folder> <images> --out predictions.csv`: the top-k classes and
their probabilities for every image under a folder, in onnxruntime or torch. An exported folder (`model.onnx` and
`model.json`, from `python -m vitexp.export --format onnx`) is read without vitexp's training code."""

from __future__ import annotations

import argparse
import csv
import importlib
import io
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from torchvision import transforms

from vitexp import VitexpError
from vitexp.files import open_regular, printable, read_bytes, write_text
from vitexp.images import UNREADABLE, open_image, to_mode

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
# What an engine is: a float32 batch (N, C, H, W) in, logits (N, classes) out
Engine = Callable[[np.ndarray], np.ndarray]


def read_card(folder: Path) -> dict[str, Any]:
    """`model.json` of an exported folder, parsed as data and checked field by field (never through a symlink)."""
    try:
        card = json.loads(read_bytes(folder / CARD_FILE, root=folder))
    except (OSError, ValueError) as e:
        raise VitexpError(
            f"cannot read {printable(folder / CARD_FILE)} ({printable(e)}); export the folder with "
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
        "input_size": isinstance(size, list) and len(size) == 3 and all(type(s) is int and 0 < s for s in size),
        "mean": isinstance(mean, list) and all(isinstance(m, number) and not isinstance(m, bool) for m in mean),
        "std": isinstance(std, list) and all(isinstance(s, number) and not isinstance(s, bool) and s > 0 for s in std),
        "interpolation": card.get("interpolation") in INTERPOLATIONS,
        # at least 1/16: the resize before the crop stays within 16x the input size
        "crop_pct": isinstance(card.get("crop_pct"), number) and 1 / 16 <= card["crop_pct"] <= 1,
        "classes": isinstance(classes, list) and len(classes) > 0 and all(isinstance(c, str) for c in classes),
    }
    bad = [key for key, ok in problems.items() if not ok]
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
    """An onnxruntime CPU session for a serialised ONNX model vitexp exported, as an engine; with a `card`, the
    model's input and output shapes must be the card's."""
    onnxruntime = require("onnxruntime")

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: not its notes on the graph optimisations it applies
    try:
        runner = onnxruntime.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types; the first line says what it could not load
        raise VitexpError(f"onnxruntime cannot load the model ({printable(e, 160)}); export it again") from None
    shapes = [list(runner.get_inputs()[0].shape[1:]), list(runner.get_outputs()[0].shape[1:])]
    if card is not None and shapes != [card["input_size"], [len(card["classes"])]]:
        raise VitexpError(
            f"{MODEL_FILE} takes {shapes[0]} and predicts {shapes[1]} classes, not what {CARD_FILE} says; "
            f"export the folder again"
        )
    return lambda x: runner.run([OUTPUT], {INPUT: x})[0]


def load_engine(source: Path, engine: str | None, data_root: Path | None) -> tuple[Engine, dict[str, Any], str]:
    """The engine, the card and the engine's name for an exported folder (onnxruntime) or a checkpoint (torch by
    default; onnxruntime exports it in memory first)."""
    if engine not in (None, *ENGINES):
        raise VitexpError(f"--engine {printable(engine)} is not one of {', '.join(ENGINES)}")
    if source.is_dir():
        if engine == "torch":
            raise VitexpError(f"{printable(source)} is an ONNX export; pass its checkpoint for --engine torch")
        card = read_card(source)
        return onnx_engine(read_bytes(source / MODEL_FILE, root=source), card), card, "onnxruntime"
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
    with open_regular(path) as f:
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
    run, card, _ = load_engine(Path(source), engine, Path(data_root) if data_root is not None else None)
    k, folder = min(topk, len(card["classes"])), Path(images)
    paths, skipped = image_files(folder)
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
    write_text(Path(out), _csv(rows, k))
    return len(rows), skipped


def _row(name: str, order: np.ndarray, probs: np.ndarray, classes: list[str]) -> list[str]:
    return [name, *(f for i, p in zip(order, probs) for f in (classes[int(i)], f"{p:.6f}"))]


def _csv(rows: list[list[str]], k: int) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label", "prob", *(f for i in range(2, k + 1) for f in (f"label_{i}", f"prob_{i}"))])
    writer.writerows(rows)
    return buffer.getvalue()


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
    try:
        rows, skipped = predict(
            args.model,
            args.images,
            args.out,
            topk=args.topk,
            engine=args.engine,
            batch_size=args.batch_size,
            data_root=args.data_root,
        )
    except VitexpError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for line in skipped:
        print(f"skipped {line}")
    print(f"wrote {args.out}: {rows} images, top-{args.topk} classes; {len(skipped)} files skipped")


if __name__ == "__main__":
    main()
