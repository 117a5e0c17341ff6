"""Structural pruning of timm ViTs on torch-pruning: whole attention heads and MLP hidden channels."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch_pruning as tp
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitexp import VitexpError

IMPORTANCE = {
    "magnitude": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "taylor": lambda: tp.importance.GroupTaylorImportance(),
    "random": lambda: tp.importance.RandomImportance(),
}


def layout_of(model: VisionTransformer) -> list[list[int]]:
    """Per block: [attention heads kept, MLP hidden width]."""
    return [[block.attn.num_heads, block.mlp.fc1.out_features] for block in model.blocks]


def uniform_layout(depth: int, num_heads: int, hidden: int, ratio: float) -> list[list[int]]:
    """`ratio` of the heads and of the MLP channels removed from every block (at least one of each kept)."""
    return [[max(1, round(num_heads * (1 - ratio))), max(1, round(hidden * (1 - ratio)))] for _ in range(depth)]


def apply_layout(model: VisionTransformer, layout: Sequence[Sequence[int]]) -> VisionTransformer:
    """Shrink each block's attention and MLP to `layout` (fresh weights), keeping timm's attributes consistent."""
    if len(layout) != len(model.blocks):
        raise VitexpError(f"pruned layout has {len(layout)} blocks but the model has {len(model.blocks)}")
    for block, (heads, hidden) in zip(model.blocks, layout):
        attn, mlp = block.attn, block.mlp
        dim, head_dim = attn.qkv.in_features, attn.head_dim
        attn.qkv = nn.Linear(dim, 3 * heads * head_dim, bias=attn.qkv.bias is not None)
        attn.proj = nn.Linear(heads * head_dim, dim, bias=attn.proj.bias is not None)
        mlp.fc1 = nn.Linear(dim, hidden, bias=mlp.fc1.bias is not None)
        mlp.fc2 = nn.Linear(hidden, dim, bias=mlp.fc2.bias is not None)
        _set_heads(attn, heads)
    return model


def _set_heads(attn: Attention, heads: int) -> None:
    # torch-pruning shrinks the weights; the attributes timm's forward reshapes with must follow.
    attn.num_heads = heads
    attn.head_dim = attn.qkv.out_features // (3 * heads)
    attn.attn_dim = heads * attn.head_dim


def prune(
    model: VisionTransformer,
    ratio: float,
    importance: str,
    example: torch.Tensor,
    steps: int = 1,
    calibration: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    prune_embed: bool = False,
    after_round: Callable[[int], None] | None = None,
) -> list[list[list[int]]]:
    """Remove `ratio` of every block's heads and MLP channels in place, in `steps` rounds.

    `calibration` batches give the gradients Taylor importance needs; `after_round(r)` runs after round r
    (e.g. to measure it). Returns the layout after each round.
    """
    if not 0 <= ratio < 1:
        raise VitexpError(f"task.ratio={ratio} must be in [0, 1)")
    if importance not in IMPORTANCE:
        raise VitexpError(f"task.importance={importance} is not one of {', '.join(IMPORTANCE)}")
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    # Only head groups (qkv rows and proj columns) and MLP hidden channels are roots; the embedding width
    # is kept unless asked for, since every residual connection shares it.
    ignored = [model.head] + ([] if prune_embed else [model.patch_embed.proj] + [b.attn.proj for b in model.blocks]
                              + [b.mlp.fc2 for b in model.blocks])  # fmt: skip
    tokens = {
        p: p.dim() - 1 for name, p in model.named_parameters() if name in ("cls_token", "dist_token", "pos_embed")
    }
    heads0, hidden0 = model.blocks[0].attn.num_heads, model.blocks[0].mlp.fc1.out_features
    layouts = []
    for round_ in range(1, steps + 1):
        # One pruner per round, asked for exact counts: after round r, keep (1 - ratio * r / steps) of the
        # original heads and channels. torch-pruning removes ceil(ratio * heads) heads and keeps
        # int((1 - ratio) * channels) channels, hence the small offsets.
        keep = uniform_layout(1, heads0, hidden0, ratio * round_ / steps)[0]
        heads, hidden = model.blocks[0].attn.num_heads, model.blocks[0].mlp.fc1.out_features
        pruner = tp.pruner.MetaPruner(
            model,
            example,
            importance=IMPORTANCE[importance](),
            pruning_ratio=max(0.0, 1 - (keep[1] + 0.5) / hidden),
            ignored_layers=ignored,
            num_heads={a.qkv: a.num_heads for a in attentions},
            prune_num_heads=True,
            prune_head_dims=False,
            head_pruning_ratio=max(0.0, (heads - keep[0]) / heads - 1e-6),
            unwrapped_parameters=list(tokens.items()),
        )
        if importance == "taylor":
            model.zero_grad()
            for images, targets in calibration or []:
                nn.functional.cross_entropy(model(images), targets).backward()
        pruner.step()
        for attn in attentions:
            _set_heads(attn, pruner.num_heads[attn.qkv])
        layouts.append(layout_of(model))
        model.zero_grad(set_to_none=True)
        if after_round is not None:
            after_round(round_)
    return layouts
