"""ONNX export of a vitexp checkpoint: `model.onnx` (torch's dynamo exporter, a dynamic batch axis, `onnx.checker`),
verified in onnxruntime against torch on the checkpoint's own validation images, and `model.json` beside it (the
evaluation preprocessing and the class names) that `python -m vitexp.predict` reads."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitexp import VitexpError, __version__, checkpoint, files
from vitexp.models import Arch, arch_of
from vitexp.predict import CARD_FILE, CARD_FORMAT, INPUT, MODEL_FILE, OUTPUT, Engine, check_card, onnx_engine, require
from vitexp.schema import Data, ImageData

log = logging.getLogger("vitexp")

CARD_VERSION = 1
# onnxruntime runs the exported model at each of these batch sizes: one (what a dynamic axis most often breaks at)
# and one above the size the exporter traced with (two), so that a batch axis frozen at trace time fails here.
BATCH_SIZES = (1, 5)
# The largest difference between onnxruntime's and torch's logits that export accepts, relative to the size of the
# logits (at least 1). Both run in float32 (eps 1.2e-7); onnxruntime fuses LayerNorm, GELU and attention and sums
# matmuls in another order, which moves a logit by about 1e-6 of its size after 12 blocks (1e-7 for vitexp's small
# models). A wrong export (a dropped head, a frozen axis, a mis-mapped op) moves logits by their own size. 1e-4 is
# 100x above rounding and 1000x below a fault.
TOLERANCE = 1e-4
MODES = {1: "L", 3: "RGB"}


@dataclass
class ExportReport:
    """What `export_onnx` wrote and measured: the folder, the largest |onnxruntime - torch| logit difference per
    batch size, the limit it was held to, the ONNX opset and the number of classes."""

    out: Path
    max_abs_diff: dict[int, float]
    limit: float
    opset: int
    classes: int

    def summary(self) -> str:
        """One line for the console."""
        diffs = ", ".join(f"batch {b}: {d:.2e}" for b, d in self.max_abs_diff.items())
        return (
            f"wrote {self.out}/{MODEL_FILE} (opset {self.opset}, dynamic batch) and {CARD_FILE} ({self.classes} "
            f"classes); onnxruntime matches torch on validation images (max abs diff {diffs}; limit {self.limit:.1e})"
        )


def export_onnx(path: str | Path, out: str | Path, *, data_root: str | Path | None = None) -> ExportReport:
    """Write checkpoint `path` as `out/model.onnx` and `out/model.json`, only after onnxruntime reproduced torch's
    logits on validation images at `BATCH_SIZES` within `TOLERANCE`; `data_root` overrides the checkpoint's."""
    files.check_output_folder(out, [MODEL_FILE, CARD_FILE])  # before any work
    model, saved = checkpoint.load_model(path)
    model.eval()
    card = model_card(saved, arch_of(model))
    classes, images = validation_images(saved, card, data_root)
    card["classes"] = classes
    if len(classes) != card["num_classes"]:
        raise VitexpError(
            f"{path} predicts {card['num_classes']} classes but its data has {len(classes)}; pass --data-root of the "
            f"data it was trained on"
        )
    proto = to_onnx(model, card)
    diffs, limit = verify(model, proto, images)
    card["verified"] = {"max_abs_diff": {str(b): d for b, d in diffs.items()}, "limit": limit, "images": "validation"}
    card["opset"] = opset_of(proto)
    check_card(card, str(path))  # what predict will check when it reads the card
    write(Path(out), proto, card)
    return ExportReport(Path(out), diffs, limit, card["opset"], len(classes))


def model_card(saved: dict[str, Any], arch: Arch) -> dict[str, Any]:
    """What a user of the exported model needs besides the weights: the input it takes (mode, size, channels) and
    the evaluation preprocessing (mean, std, interpolation, crop_pct), read from the checkpoint's config and `arch`
    (its model's, `vitexp.models.arch_of`)."""
    kwargs = arch.kwargs
    data = _data_config(saved)
    size, chans, num_classes = kwargs.get("img_size"), kwargs.get("in_chans"), kwargs.get("num_classes")
    size = size[0] if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1] else size
    if type(size) is not int or chans not in MODES or type(num_classes) is not int:
        raise VitexpError(
            "the checkpoint's arch records no square img_size, in_chans 1 or 3 and num_classes as integers; pass a "
            "checkpoint vitexp wrote"
        )
    try:
        mean, std = [float(m) for m in data["mean"]], [float(s) for s in data["std"]]
        crop_pct, interpolation = float(data["crop_pct"]), str(data["interpolation"])
    except (KeyError, TypeError, ValueError):
        raise VitexpError(
            "the checkpoint records no data.mean, std, crop_pct and interpolation; pass a checkpoint vitexp wrote"
        ) from None
    return {
        "format": CARD_FORMAT,
        "version": CARD_VERSION,
        "model_file": MODEL_FILE,
        "input": INPUT,
        "output": OUTPUT,
        "model": arch.name,
        "image_mode": MODES[chans],
        "input_size": [chans, size, size],
        "num_classes": num_classes,
        "mean": mean,
        "std": std,
        "interpolation": interpolation,
        "crop_pct": crop_pct,
        "vitexp_version": __version__,
    }


def _data_config(saved: dict[str, Any]) -> dict[str, Any]:
    config = saved.get(checkpoint.CONFIG)
    data = config.get("data") if isinstance(config, dict) else None
    if not isinstance(data, dict):
        raise VitexpError("the checkpoint records no data config; pass a checkpoint vitexp wrote")
    return data


def validation_images(
    saved: dict[str, Any], card: dict[str, Any], data_root: str | Path | None, count: int = max(BATCH_SIZES)
) -> tuple[list[str], torch.Tensor]:
    """The class names of the checkpoint's data and `count` images of its validation split (the run's own seeded
    split), through the evaluation transform the card describes."""
    from vitexp.data import eval_transform, make_splits

    data, config = _data_config(saved), saved[checkpoint.CONFIG]
    seen = {
        "name": str(data.get("name")),
        "img_size": card["input_size"][1],
        "in_chans": card["input_size"][0],
        "mean": card["mean"],
        "std": card["std"],
        "crop_pct": card["crop_pct"],
        "interpolation": card["interpolation"],
        "val_size": data.get("val_size"),
        "train_subset": data.get("train_subset"),
        "split_seed": data.get("split_seed"),  # absent in checkpoints from before it existed: the run's seed
    }
    if seen["name"] == "digits":
        typed = Data(**seen)
    else:
        root = data_root if data_root is not None else data.get("root")
        if not isinstance(root, (str, Path)):
            raise VitexpError("the checkpoint records no data.root; pass --data-root <the folder it was trained on>")
        typed = ImageData(**seen, root=str(root), download=False, check_images=False)
    transform = eval_transform(typed)
    splits = make_splits(typed, config.get("seed"), transform, transform)
    return list(splits.classes), _first_readable(splits.val, count)


def _first_readable(dataset: Any, count: int) -> torch.Tensor:
    """`count` images of `dataset` (repeated when it holds fewer), skipping the ones that fail to decode."""
    images = []
    for i in range(len(dataset)):
        try:
            images.append(dataset[i][0])
        except VitexpError:
            continue
        if len(images) == count:
            break
    if not images:
        raise VitexpError(
            "the validation split holds no readable image; pass --data-root of the data it was trained on"
        )
    return torch.stack([images[i % len(images)] for i in range(count)])


def to_onnx(model: nn.Module, card: dict[str, Any]) -> Any:
    """`model` as an ONNX ModelProto from torch's dynamo exporter, the batch axis dynamic, checked by onnx.checker."""
    onnx = require("onnx")
    require("onnxscript")  # torch's dynamo exporter imports it
    example = torch.zeros(2, *card["input_size"])  # not 1: torch.export specialises an axis traced at size 1
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracing chatter, not the user's concern
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                verbose=False,
            )
    except Exception as e:  # the exporter raises many types; the first line says which op failed
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VitexpError(f"torch.onnx.export failed ({files.printable(first)}); export the timm folder instead") from e
    proto = program.model_proto
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise VitexpError(f"onnx.checker rejects the exported model ({files.printable(e)}); report it") from None
    return proto


def opset_of(proto: Any) -> int:
    """The default-domain opset the ONNX model uses."""
    return next(int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def verify(model: nn.Module, proto: Any, images: torch.Tensor) -> tuple[dict[int, float], float]:
    """Run `images` (the first 1, then 5 of them) through torch and onnxruntime; the largest absolute logit difference
    per batch size and the limit; above the limit a `VitexpError` (nothing is written)."""
    runner = onnx_engine(proto.SerializeToString())
    diffs, limit = {}, TOLERANCE
    for batch in BATCH_SIZES:
        x = images[:batch]
        with torch.no_grad():
            expected = model(x).float().numpy()
        got = runner(x.numpy())
        if got.shape != expected.shape:
            raise VitexpError(
                f"onnxruntime returns {got.shape} logits for {expected.shape}; the batch axis is not dynamic"
            )
        diffs[batch] = float(np.abs(got - expected).max())
        limit = max(limit, TOLERANCE * float(np.abs(expected).max()))
    worst = max(diffs.values())
    if not worst <= limit:  # NaN fails too
        raise VitexpError(
            f"onnxruntime's logits differ from torch's by {worst:.2e} (limit {limit:.1e}); the export is wrong, nothing "
            f"was written; export the timm folder instead"
        )
    return diffs, limit


def write(out: Path, proto: Any, card: dict[str, Any]) -> None:
    """`model.onnx` and `model.json` into `out`, each through a temporary file and a rename."""
    try:
        data = proto.SerializeToString()
    except ValueError:
        raise VitexpError(
            "the model is above protobuf's 2 GB limit for one ONNX file; export the timm folder"
        ) from None
    files.write_bytes(out / MODEL_FILE, data, root=out)
    files.write_text(out / CARD_FILE, json.dumps(card, indent=2) + "\n", root=out)


def checkpoint_engine(path: Path, engine: str, data_root: Path | None) -> tuple[Engine, dict[str, Any], str]:
    """A checkpoint as an engine for `vitexp.predict` (torch eager, or onnxruntime on its ONNX export made in memory),
    its card, and the engine's name; class names from its data, or numbers when that data is not found."""
    model, saved = checkpoint.load_model(path)
    model.eval()
    card = model_card(saved, arch_of(model))
    try:
        card["classes"] = validation_images(saved, card, data_root, count=1)[0]
    except VitexpError as e:
        log.warning(f"class names as numbers: {e}")
        card["classes"] = [str(i) for i in range(card["num_classes"])]
    if len(card["classes"]) != card["num_classes"]:
        raise VitexpError(
            f"{path} predicts {card['num_classes']} classes but its data has {len(card['classes'])}; "
            f"pass --data-root of the data it was trained on"
        )
    if engine == "onnxruntime":
        return onnx_engine(to_onnx(model, card).SerializeToString()), card, engine

    def run_torch(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).float().numpy()

    return run_torch, card, engine


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options `--format onnx` adds to `python -m vitexp.export`."""
    parser.add_argument(
        "--data-root", type=Path, default=None, help="onnx: the data folder, when not where the checkpoint was trained"
    )


def run(args: argparse.Namespace) -> str:
    """Export `args.checkpoint` to `args.out` as ONNX; the line to print."""
    return export_onnx(args.checkpoint, args.out, data_root=args.data_root).summary()


def main(argv: list[str] | None = None) -> None:
    """Console entry point (`python -m vitexp.onnx_export`)."""
    parser = argparse.ArgumentParser(prog="python -m vitexp.onnx_export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a vitexp checkpoint (best.pt, last.pt)")
    parser.add_argument("--out", type=Path, required=True, help=f"the folder to write ({MODEL_FILE}, {CARD_FILE})")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        line = run(args)
    except VitexpError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(line)


if __name__ == "__main__":
    main()
