"""`python -m vitexp.explain <checkpoint> <images> --method <m> --out <folder>`: where a model looks when it decides,
as Grad-CAM, Grad-CAM++, EigenCAM, LayerCAM (jacobgil's grad-cam package) or attention rollout (Abnar & Zuidema
2020), one overlay PNG per image, a grid of all and explain.csv; the maps for any vitexp model (ViTs with any prefix
tokens and uneven heads, CNNs for the CAM methods)."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import UnidentifiedImageError
from torch import nn

from vitexp import VitexpError, run_on_files
from vitexp.files import check_output_folder, make_folder, plot_text, printable, save_figure, write_csv
from vitexp.images import UNREADABLE

CAM_METHODS = ("gradcam", "gradcam++", "eigencam", "layercam")
METHODS = (*CAM_METHODS, "rollout")
FUSIONS = ("mean", "max", "min")
# images drawn in the grid PNG: beyond that it is too large to look at (every image still has its own PNG and row)
GRID_MAX = 256
GRID_COLUMNS = 8


@dataclass
class Explained:
    """One image explained: its name, the image as the model saw it (H, W, 3 in [0, 1]), the map over it (H, W in
    [0, 1]), the explained class and its probability, the top-3 classes with probabilities."""

    name: str
    image: np.ndarray
    cam: np.ndarray
    target: int
    prob: float
    top: list[tuple[int, float]]

    @property
    def peak(self) -> tuple[int, int]:
        """The map's maximum as (x, y) in pixels of the model's input."""
        y, x = np.unravel_index(int(np.argmax(self.cam)), self.cam.shape)
        return int(x), int(y)


@dataclass
class Row:
    """One row of explain.csv: the image's path under the folder, the explained class, its probability and the
    map's peak in pixels of the model's input."""

    path: str
    label: str
    prob: float
    peak_x: int
    peak_y: int


def is_vit(model: nn.Module) -> bool:
    """A timm ViT (class, distillation or register tokens, any heads per block): tokens on a patch grid."""
    return all(hasattr(model, a) for a in ("blocks", "patch_embed", "num_prefix_tokens"))


def target_layer(model: nn.Module) -> nn.Module:
    """The layer whose activations a CAM weighs: a ViT's last block's `norm1` (the pytorch-grad-cam reference for
    ViTs: the last block's output only feeds the class token's head, so its patch tokens carry no gradient), a CNN's
    last feature stage (timm's `feature_info`)."""
    if is_vit(model):
        return model.blocks[-1].norm1
    info = getattr(model, "feature_info", None)
    if info:
        return model.get_submodule(info[-1]["module"])
    raise VitexpError(f"{type(model).__name__} is neither a timm ViT nor a timm CNN with feature_info; no CAM layer")


def vit_reshape(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Tokens (B, prefix + h*w, C) to a feature map (B, C, h, w), every prefix token (class, distillation,
    registers) dropped."""
    prefix, (h, w) = model.num_prefix_tokens, model.patch_embed.grid_size

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, prefix:, :]
        return patches.reshape(tokens.shape[0], h, w, tokens.shape[-1]).permute(0, 3, 1, 2)

    return reshape


def cam_maps(model: nn.Module, x: torch.Tensor, targets: Sequence[int], method: str) -> np.ndarray:
    """The CAM `method` of `model` for class `targets[i]` of image `x[i]`: (B, H, W) in [0, 1], H x W the input's."""
    from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, LayerCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cams = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "eigencam": EigenCAM, "layercam": LayerCAM}
    reshape = vit_reshape(model) if is_vit(model) else None
    with cams[method](model=model, target_layers=[target_layer(model)], reshape_transform=reshape) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    return np.nan_to_num(np.asarray(maps, dtype=np.float32))


def attentions(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Each block's attention probabilities (B, heads of that block, N, N) for `x`, read by a hook on timm's
    `attn_drop` with the fused kernel (which computes no matrix) switched off for this pass."""
    found: list[torch.Tensor] = []
    modules = [block.attn for block in model.blocks]
    fused = [m.fused_attn for m in modules]
    hooks = [m.attn_drop.register_forward_hook(lambda _m, _i, out: found.append(out.detach())) for m in modules]
    try:
        for m in modules:
            m.fused_attn = False
        with torch.no_grad():
            model(x)
    finally:
        for m, was in zip(modules, fused):
            m.fused_attn = was
        for hook in hooks:
            hook.remove()
    return found


def rollout(model: nn.Module, x: torch.Tensor, fusion: str = "max", discard_ratio: float = 0.9) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema 2020) as jacobgil's vit-explain computes it: heads fused per block (each
    block its own head count), the weakest `discard_ratio` of the links dropped, the identity added for the residual,
    rows renormalised, blocks multiplied; the class token's row over the patches (the mean row without a class
    token), upsampled to the input: (B, H, W) in [0, 1]."""
    if not is_vit(model):
        raise VitexpError(f"rollout needs a ViT's attention; {type(model).__name__} has none: use --method gradcam")
    if fusion not in FUSIONS or not 0 <= discard_ratio < 1:
        raise VitexpError(f"--fusion {printable(fusion)} must be one of {', '.join(FUSIONS)}, discard ratio in [0, 1)")
    model.eval()
    result = None
    for attention in attentions(model, x):
        fused = getattr(attention.float(), fusion)(dim=1)
        fused = fused.values if fusion != "mean" else fused
        flat = fused.reshape(fused.shape[0], -1).clone()
        drop = flat.topk(int(flat.shape[-1] * discard_ratio), dim=-1, largest=False).indices
        flat.scatter_(1, drop, 0.0)
        flat[:, 0] = fused.reshape(fused.shape[0], -1)[:, 0]  # the class token's link to itself is kept
        eye = torch.eye(fused.shape[-1], device=fused.device)
        a = (flat.reshape(fused.shape) + eye) / 2
        a = a / a.sum(dim=-1, keepdim=True)
        result = a if result is None else a @ result
    prefix, (h, w) = model.num_prefix_tokens, model.patch_embed.grid_size
    row = result[:, 0] if getattr(model, "cls_token", None) is not None else result.mean(dim=1)
    mask = row[:, prefix:].reshape(-1, 1, h, w)
    mask = torch.nn.functional.interpolate(mask.cpu(), size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
    mask = mask[:, 0]
    mask = mask - mask.amin(dim=(1, 2), keepdim=True)
    return np.nan_to_num((mask / mask.amax(dim=(1, 2), keepdim=True).clamp(min=1e-12)).numpy())


def explain_batch(
    model: nn.Module, x: torch.Tensor, method: str, target: int | None = None, **rollout_args: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The maps (B, H, W), the explained classes (`target`, or each image's predicted class) and the softmax
    probabilities (B, classes) of `model` on the batch `x`."""
    if method not in METHODS:
        raise VitexpError(f"--method {printable(method)} is not one of {', '.join(METHODS)}")
    model.eval()
    x = x.to(next(model.parameters()).device)
    with torch.no_grad():
        probs = model(x).float().softmax(dim=-1).cpu().numpy()
    targets = np.full(len(x), target) if target is not None else probs.argmax(axis=1)
    if method == "rollout":
        return rollout(model, x, **rollout_args), targets, probs
    return cam_maps(model, x, targets, method), targets, probs


def as_seen(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised batch (B, C, H, W) back to images (B, H, W, 3) in [0, 1]: what the model saw."""
    x = x.detach().cpu().float()
    images = x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    images = images.clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return np.repeat(images, 3, axis=3) if images.shape[3] == 1 else images


def overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """The map in the jet colour map over the image, half and half (grad-cam's `show_cam_on_image`)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(image.astype(np.float32), cam.astype(np.float32), use_rgb=True, image_weight=0.5)


def figure_of(item: Explained, classes: Sequence[str], method: str) -> Any:
    """One image's PNG: the image as the model saw it, the map over it, the top-3 classes with probabilities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.6))
    axes[0].imshow(item.image)
    axes[0].set_title(plot_text(item.name, 40), fontsize=8)
    axes[1].imshow(overlay(item.image, item.cam))
    axes[1].plot(*item.peak, marker="+", color="white", markersize=10)
    axes[1].set_title(f"{method}: {plot_text(classes[item.target], 30)}", fontsize=8)
    for ax in axes:
        ax.axis("off")
    top = "   ".join(f"{plot_text(classes[c], 20)} {p:.2f}" for c, p in item.top)
    fig.text(0.5, 0.03, top, ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def grid_of(items: Sequence[Explained], classes: Sequence[str], title: str, label: str = "") -> Any:
    """One figure of many overlays, each titled with its name, `label` and explained class with its probability
    (and `title` above)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(GRID_COLUMNS, max(1, len(items)))
    rows = max(1, math.ceil(len(items) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.9 * columns, 2.1 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, item in zip(axes.flat, items):
        ax.imshow(overlay(item.image, item.cam))
        caption = f"{label}{plot_text(classes[item.target], 18)} {item.prob:.2f}"
        ax.set_title(f"{plot_text(item.name, 22)}\n{caption}", fontsize=6)
    fig.suptitle(plot_text(title, 120), fontsize=9)
    fig.tight_layout()
    return fig


def mistakes(
    model: nn.Module,
    dataset: Any,
    order: Sequence[int],
    classes: Sequence[str],
    norm: tuple[Sequence[float], Sequence[float]],
    count: int = 16,
) -> list[Explained]:
    """Grad-CAM of the predicted class of the first `count` images of `dataset` at `order` (the most confidently
    wrong first), each named by its true class."""
    picked = list(order)[:count]
    if not picked:
        return []
    x, truth = zip(*(dataset[i] for i in picked))
    batch = torch.stack(x)
    maps, targets, probs = explain_batch(model, batch, "gradcam")
    images = as_seen(batch, *norm)
    return [
        Explained(f"true {classes[int(t)]}", image, cam, int(c), float(p[c]), [])
        for t, image, cam, c, p in zip(truth, images, maps, targets, probs)
    ]


class Mistakes:
    """The images an evaluation pass gets wrong, the most confident first: `engine.evaluate`'s `on_batch` on an
    unshuffled loader of `batch_size`, so that the figure needs no second pass over the split."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size, self.wrong = batch_size, []

    def __call__(self, b: int, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Note batch `b`'s wrong images by their dataset positions and the confidence of the wrong class."""
        confidence, predicted = logits.softmax(dim=-1).max(dim=-1)
        right = (predicted == targets).tolist()
        start = b * self.batch_size
        self.wrong += [(-c, start + i) for i, (c, ok) in enumerate(zip(confidence.tolist(), right)) if not ok]

    def order(self) -> list[int]:
        """The dataset positions of the wrong images, the most confidently wrong first."""
        return [i for _, i in sorted(self.wrong)]


def plot_mistakes(
    model: nn.Module,
    dataset: Any,
    wrong: Sequence[int],
    classes: Sequence[str],
    norm: tuple[Sequence[float], Sequence[float]],
    path: Path,
    *,
    title: str,
    root: Path,
) -> int:
    """`path`: Grad-CAM of the first 16 images of `dataset` at positions `wrong` (`Mistakes.order()`), with their
    true and predicted classes; the same images to the W&B run when one is open. Returns how many were wrong."""
    from vitexp import tracking

    try:
        target_layer(model)
    except VitexpError as e:  # a figure is not worth failing the evaluation for
        logging.getLogger("vitexp").warning(f"no {path.name}: {e}")
        return 0
    shown = mistakes(model, dataset, wrong, classes, norm)
    save(grid_of(shown, classes, f"{title}: {len(shown)} most confidently wrong of {len(wrong)}", "pred "), path, root)
    captions = [f"{item.name}, predicted {printable(classes[item.target])} ({item.prob:.2f})" for item in shown]
    tracking.log_images("mistakes", [(overlay(item.image, item.cam), c) for item, c in zip(shown, captions)])
    return len(wrong)


def save(fig: Any, path: Path, root: Path) -> None:
    """`fig` as a PNG through the one writer, then closed."""
    import matplotlib.pyplot as plt

    try:
        save_figure(fig, path, root)
    finally:
        plt.close(fig)


def write_rows(path: Path, rows: Sequence[Row], root: Path) -> None:
    """explain.csv: path, the explained class and its probability, the map's peak in input pixels (names as data)."""
    cells = ([row.path, row.label, round(row.prob, 6), row.peak_x, row.peak_y] for row in rows)
    write_csv(path, ["path", "label", "prob", "peak_x", "peak_y"], cells, root)


def _target_index(target: str | None, classes: Sequence[str]) -> int | None:
    if target is None:
        return None
    if target in classes:
        return list(classes).index(target)
    if target.isdigit() and int(target) < len(classes):
        return int(target)
    raise VitexpError(f"--target {printable(target)} is neither a class name nor a class number below {len(classes)}")


def _load(source: Path, data_root: Path | None) -> tuple[nn.Module, dict[str, Any]]:
    """The checkpoint's model (eval, CPU) and its card: the evaluation preprocessing and, as predict finds them, the
    class names (numbers when its data is not found)."""
    from vitexp import checkpoint
    from vitexp.models import arch_of
    from vitexp.onnx_export import model_card, validation_images

    model, saved = checkpoint.load_model(source)
    card = model_card(saved, arch_of(model))
    try:
        card["classes"] = validation_images(saved, card, data_root, count=1)[0]
    except VitexpError as e:
        print(f"class names as numbers: {e}", file=sys.stderr)
        card["classes"] = [str(i) for i in range(card["num_classes"])]
    if len(card["classes"]) != card["num_classes"]:
        raise VitexpError(
            f"{printable(source)} predicts {card['num_classes']} classes but its data has {len(card['classes'])}; "
            f"pass --data-root of the data it was trained on"
        )
    return model.eval(), card


def _batches(
    folder: Path, card: dict[str, Any], batch_size: int, skipped: list[str]
) -> Iterator[tuple[list[str], torch.Tensor]]:
    """The readable images under `folder` (or the one file), `batch_size` at a time through the card's evaluation
    transform, with their names; read as predict reads them (no symlink followed, regular files only). A file that
    is not read joins `skipped` with why."""
    from vitexp.predict import image_files, preprocess, read_image

    paths, links = ([folder], []) if folder.is_file() and not folder.is_symlink() else image_files(folder)
    base, transform, names, tensors = folder.parent if folder.is_file() else folder, preprocess(card), [], []
    skipped += links
    for k, path in enumerate(paths, 1):
        name = path.relative_to(base).as_posix()
        try:
            tensors.append(transform(read_image(path, card["image_mode"])))
            names.append(name)
        except (*UNREADABLE, VitexpError) as e:
            why = "not an image file PIL reads" if isinstance(e, UnidentifiedImageError) else printable(e, 120)
            skipped.append(f"{printable(name)} ({why})")
        if tensors and (len(tensors) == batch_size or k == len(paths)):
            yield names, torch.stack(tensors)
            names, tensors = [], []


def explain(
    source: str | Path,
    images: str | Path,
    out: str | Path,
    *,
    method: str = "gradcam",
    target: str | None = None,
    batch_size: int = 16,
    data_root: str | Path | None = None,
) -> tuple[list[Row], list[str]]:
    """Write, under `out`, `images/<path>.png` for every readable image under `images`, `grid.png` (the first
    `GRID_MAX`) and `explain.csv`; returns explain.csv's rows and the files skipped, each with why."""
    if method not in METHODS or batch_size < 1:
        raise VitexpError(f"--method {printable(method)} must be one of {', '.join(METHODS)}, --batch-size >= 1")
    check_output_folder(out, ["explain.csv", "grid.png"])  # before any work: never a folder, device or FIFO replaced
    model, card = _load(Path(source), Path(data_root) if data_root is not None else None)
    classes, out, skipped = card["classes"], make_folder(Path(out)), []
    wanted, rows, shown = _target_index(target, classes), [], []
    for names, x in _batches(Path(images), card, batch_size, skipped):
        maps, targets, probs = explain_batch(model, x, method, wanted)
        for name, image, cam, t, p in zip(names, as_seen(x, card["mean"], card["std"]), maps, targets, probs):
            top = [(int(c), float(p[c])) for c in np.argsort(-p, kind="stable")[:3]]
            item = Explained(name, image, cam, int(t), float(p[t]), top)
            save(figure_of(item, classes, method), out / "images" / f"{name}.png", out)
            rows.append(Row(name, classes[item.target], item.prob, *item.peak))
            shown += [item] if len(shown) < GRID_MAX else []
    if shown:
        more = f" (first {GRID_MAX} of {len(rows)})" if len(rows) > GRID_MAX else ""
        save(grid_of(shown, classes, f"{method} of {card['model']}{more}"), out / "grid.png", out)
    write_rows(out / "explain.csv", rows, out)
    return rows, skipped


def main(argv: list[str] | None = None) -> None:
    """Console entry point (`python -m vitexp.explain`)."""
    parser = argparse.ArgumentParser(prog="python -m vitexp.explain", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a vitexp checkpoint (best.pt)")
    parser.add_argument("images", type=Path, help="an image file, or a folder of images (nested folders)")
    parser.add_argument("--method", choices=METHODS, default="gradcam", help="the map to compute")
    parser.add_argument("--target", default=None, help="the class to explain (name or number); default: predicted")
    parser.add_argument("--out", type=Path, default=Path("explain"), help="the folder to write")
    parser.add_argument("--batch-size", type=int, default=16, help="images per pass")
    parser.add_argument("--data-root", type=Path, default=None, help="a checkpoint's data folder, for class names")
    args = parser.parse_args(argv)
    rows, skipped = run_on_files(
        lambda: explain(
            args.checkpoint,
            args.images,
            args.out,
            method=args.method,
            target=args.target,
            batch_size=args.batch_size,
            data_root=args.data_root,
        )
    )
    print(f"wrote {args.out}: {len(rows)} images explained by {args.method}; {len(skipped)} files skipped")


if __name__ == "__main__":
    main()
