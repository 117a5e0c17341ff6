"""`python -m vitexp.export <checkpoint> --out <folder> [--format timm|onnx]`: a vitexp checkpoint as timm's model
folder (`config.json` + `model.safetensors`, what `timm.models.save_for_hf` writes), which
`timm.create_model("local-dir:<folder>", pretrained=True)` loads without vitexp and `model.pretrained=<folder>`
fine-tunes from; or, with `--format onnx`, as `model.onnx` + `model.json` (vitexp.onnx_export)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import save_for_hf
from torch import nn

from vitexp import VitexpError, checkpoint, files, onnx_export
from vitexp.models import Arch, arch_of

# The timm architecture a vitexp-built ViT is written as: its own arguments (all of them) replace the entrypoint's.
TIMM_TWINS = {"vit": "vit_tiny_patch16_224", "vit_distilled": "deit_tiny_distilled_patch16_224"}


def timm_module(model: nn.Module) -> nn.Module:
    """The checkpoint's model as a module timm's factory made, with the same weights: what timm's folder can
    describe. Pruned layouts and small-input CNN stems have no timm arguments and are refused."""
    arch = arch_of(model)
    builder, kwargs = arch.builder, arch.kwargs
    reshaped = kwargs.get("layout") or kwargs.get("embed_width") or kwargs.get("small_input")
    if builder == "timm" and not reshaped:
        return model  # built by timm.create_model, which recorded its arguments
    if builder in TIMM_TWINS and not reshaped:
        twin = timm.create_model(TIMM_TWINS[builder], pretrained=False, **kwargs)
        twin.load_state_dict(model.state_dict())
        return twin
    shape = "a small-input stem" if kwargs.get("small_input") else "a pruned layout"
    raise VitexpError(
        f"a {builder} model with {shape} has no timm model arguments to write; export an unpruned ViT, a model=timm "
        f"or a timm CNN checkpoint without small_input"
    )


def data_config(saved: dict[str, Any], arch: Arch) -> dict[str, Any]:
    """The preprocessing the checkpoint was trained with (its data's mean, std and image size), for config.json;
    `arch`: its model's (`vitexp.models.arch_of`)."""
    data = (saved.get(checkpoint.CONFIG) or {}).get("data") or {}
    kwargs = arch.kwargs
    size = kwargs["img_size"]
    hw = (size, size) if isinstance(size, int) else tuple(size)
    try:
        mean, std = tuple(float(m) for m in data["mean"]), tuple(float(s) for s in data["std"])
    except (KeyError, TypeError, ValueError):
        raise VitexpError(
            "the checkpoint records no data.mean and data.std as numbers; pass a checkpoint vitexp wrote"
        ) from None
    # vitexp evaluates on images resized (torchvision's bilinear) to img_size, no centre crop
    return {
        "input_size": (kwargs["in_chans"], *hw),
        "mean": mean,
        "std": std,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
    }


# what timm's save_for_hf writes into the folder
TIMM_FILES = ("config.json", "model.safetensors")


def export(path: str | Path, out: str | Path) -> float:
    """Write checkpoint `path` as a timm model folder `out`; returns the largest absolute difference between the
    logits of the checkpoint's model and of the folder loaded back through timm, on a fixed random batch."""
    files.check_output_folder(out, list(TIMM_FILES))  # before any work
    model, saved = checkpoint.load_model(path)
    module = timm_module(model).eval()
    config = data_config(saved, arch_of(model))
    write_folder(module, config, Path(out))
    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(4, *config["input_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (model.eval()(x) - reloaded(x)).abs().max().item()


def write_folder(module: nn.Module, config: dict[str, Any], out: Path) -> None:
    """timm's files for `module` in `out`: written by timm into a temporary folder inside `out`, then each renamed
    into place, so that a symlink planted in `out` is replaced, never written through."""
    try:
        files.make_folder(out, root=out)
        staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    except OSError as e:
        raise VitexpError(f"cannot write {out} ({e.strerror}); pick a writable --out folder") from None
    try:
        # the tag names where the weights come from (the architecture's own tag would name timm's weights)
        tag = {"pretrained_cfg": {"tag": "vitexp"}}
        save_for_hf(module, str(staging), model_config=tag, safe_serialization=True, data_config=config)
        for written in sorted(staging.iterdir()):
            files.check_output(out / written.name)  # never a folder, device or FIFO made there meanwhile
            os.replace(written, out / written.name)  # a rename replaces a link there, it never writes through it
    except OSError as e:
        raise VitexpError(f"cannot write {out} ({e.strerror}); pick a writable --out folder") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    """Console entry point (`python -m vitexp.export`)."""
    parser = argparse.ArgumentParser(prog="python -m vitexp.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a vitexp checkpoint (best.pt, last.pt)")
    parser.add_argument(
        "--out", type=Path, required=True, help="the folder to write (timm: config.json, model.safetensors)"
    )
    parser.add_argument(
        "--format",
        choices=("timm", "onnx"),
        default="timm",
        help="timm: config.json + model.safetensors; onnx: model.onnx + model.json (every model vitexp trains)",
    )
    onnx_export.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        if args.format == "onnx":
            print(onnx_export.run(args))
            return
        diff = export(args.checkpoint, args.out)
    except VitexpError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(
        f"wrote {args.out}/config.json and model.safetensors; timm.create_model('local-dir:{args.out}', "
        f"pretrained=True) reproduces the checkpoint's logits (max abs diff {diff:.2e})"
    )


if __name__ == "__main__":
    main()
