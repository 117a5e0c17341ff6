"""Structural pruning of timm ViTs on torch-pruning: whole attention heads and MLP hidden channels."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch_pruning as tp
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitexp import VitexpError
from vitexp.schema import Prune

IMPORTANCE = {
    "magnitude": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "taylor": lambda: tp.importance.GroupTaylorImportance(),
    "random": lambda: tp.importance.RandomImportance(),
}
# Scores that rank heads and channels across blocks (task.allocation=global). Torch-Pruning's importances divide
# each group's scores by the group's mean, so a block's ranks describe only its own spread. First-order Taylor
# without that normaliser estimates each unit's loss change, one scale for every block (on the digits at ratio 0.5:
# 82.5% val top-1 before fine-tuning against uniform's 60.3%, docs/pruning.md). Weight norms differ between blocks
# for reasons other than importance (a raw magnitude ranking kept 41.9%), so magnitude keeps the normaliser.
RANKING = {
    "magnitude": IMPORTANCE["magnitude"],
    "taylor": lambda: tp.importance.GroupTaylorImportance(normalizer=None),
    "random": IMPORTANCE["random"],
}
# Global allocation by Taylor scores takes each round in this many steps, the scores recomputed on the model pruned
# so far: once a block has lost units, its others carry more of the loss, which one ranking up front cannot see (on
# the CIFAR-10 subset at ratio 0.5, 3 seeds: 45.9% after 3 epochs of fine-tuning against 44.8% in one step and
# uniform's 43.7%, docs/pruning.md). Magnitude scores do not change as others go, so they rank once a round.
GLOBAL_STEPS = 4


def layout_of(model: VisionTransformer) -> list[list[int]]:
    """Per block: [attention heads kept, MLP hidden width]."""
    return [[block.attn.num_heads, block.mlp.fc1.out_features] for block in model.blocks]


def rounded_width(hidden: int, keep: float, round_to: int) -> int:
    """`keep` of `hidden` MLP channels, to the nearest multiple of `round_to` (at least one multiple, at most `hidden`)."""
    return min(hidden, max(round_to, round(hidden * keep / round_to) * round_to))


def uniform_layout(depth: int, num_heads: int, hidden: int, ratio: float, round_to: int = 1) -> list[list[int]]:
    """`ratio` of the heads and of the MLP channels removed from every block (at least one of each kept), the MLP
    width rounded to a multiple of `round_to`."""
    return [[max(1, round(num_heads * (1 - ratio))), rounded_width(hidden, 1 - ratio, round_to)] for _ in range(depth)]


def global_layout(
    scores: Sequence[tuple[torch.Tensor, torch.Tensor]], heads: int, width: int, round_to: int
) -> list[list[int]]:
    """Keep the `heads` best heads and the `width` best MLP channels of the whole model, ranked across blocks by
    `scores` (per block: head importances, channel importances); every block keeps at least one head and one
    multiple of `round_to` channels, and the MLP widths are multiples of `round_to` that sum to `width`."""
    kept_heads = _keep_best([s for s, _ in scores], heads, 1)
    kept = _keep_best([s for _, s in scores], width, round_to)
    caps = [len(s) // round_to for _, s in scores]
    units = [min(cap, max(1, k // round_to)) for k, cap in zip(kept, caps)]
    # largest remainder: whole multiples go to the blocks whose ranked widths were cut the most by flooring
    short = [k / round_to - u for k, u in zip(kept, units)]
    for _ in range(min(width // round_to, sum(caps)) - sum(units)):
        i = max((i for i in range(len(units)) if units[i] < caps[i]), key=lambda i: short[i])
        units[i], short[i] = units[i] + 1, short[i] - 1
    for _ in range(sum(units) - width // round_to):
        i = min((i for i in range(len(units)) if units[i] > 1), key=lambda i: short[i])
        units[i], short[i] = units[i] - 1, short[i] + 1
    return [[h, u * round_to] for h, u in zip(kept_heads, units)]


def _keep_best(scores: Sequence[torch.Tensor], total: int, floor: int) -> list[int]:
    """How many of each block's units are among the `total` best of all blocks, each block keeping its best `floor`."""
    kept = [min(floor, len(s)) for s in scores]
    rest = [s.sort(descending=True).values[k:] for s, k in zip(scores, kept)]
    owner = torch.cat([torch.full((len(r),), i) for i, r in enumerate(rest)])
    best = torch.cat(rest).argsort(descending=True, stable=True)[: max(0, total - sum(kept))]
    return [k + int(n) for k, n in zip(kept, torch.bincount(owner[best], minlength=len(scores)))]


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


def set_embed_width(model: VisionTransformer, width: int) -> VisionTransformer:
    """Rebuild every layer that reads or writes the residual stream at `width` channels (fresh weights): what
    `task.prune_embed=true` leaves, so that its `arch` rebuilds. Head widths (`head_dim`) stay as they are."""
    if getattr(model, "attn_pool", None) is not None:
        raise VitexpError("model.embed_width needs a ViT without attention pooling (global_pool=map)")

    def linear(layer: nn.Linear, n_in: int | None = None, n_out: int | None = None) -> nn.Linear:
        return nn.Linear(n_in or layer.in_features, n_out or layer.out_features, bias=layer.bias is not None)

    def norm(layer: nn.Module) -> nn.Module:
        if not isinstance(layer, nn.LayerNorm):
            return layer
        return nn.LayerNorm(
            width, eps=layer.eps, elementwise_affine=layer.elementwise_affine, bias=layer.bias is not None
        )

    proj = model.patch_embed.proj
    model.patch_embed.proj = nn.Conv2d(
        proj.in_channels, width, proj.kernel_size, proj.stride, proj.padding, bias=proj.bias is not None
    )
    model.patch_embed.norm = norm(model.patch_embed.norm)
    for name in ("cls_token", "reg_token", "dist_token", "pos_embed"):
        if isinstance(token := getattr(model, name, None), nn.Parameter):
            setattr(model, name, nn.Parameter(token.new_zeros(*token.shape[:-1], width)))
    for block in model.blocks:
        block.norm1, block.norm2 = norm(block.norm1), norm(block.norm2)
        block.attn.qkv, block.attn.proj = linear(block.attn.qkv, n_in=width), linear(block.attn.proj, n_out=width)
        block.mlp.fc1, block.mlp.fc2 = linear(block.mlp.fc1, n_in=width), linear(block.mlp.fc2, n_out=width)
        for scale in (block.ls1, block.ls2):
            if isinstance(gamma := getattr(scale, "gamma", None), nn.Parameter):
                scale.gamma = nn.Parameter(gamma.new_ones(width))
    model.norm_pre, model.norm, model.fc_norm = norm(model.norm_pre), norm(model.norm), norm(model.fc_norm)
    if isinstance(model.head, nn.Linear):
        model.head = linear(model.head, n_in=width)
    model.embed_dim = model.num_features = width
    if hasattr(model, "head_hidden_size"):
        model.head_hidden_size = width
    return model


def embed_width(model: VisionTransformer) -> int:
    """The residual stream's width as the weights have it (pruning leaves timm's `embed_dim` attribute behind)."""
    return model.patch_embed.proj.out_channels


def _set_heads(attn: Attention, heads: int) -> None:
    # torch-pruning shrinks the weights; the attributes timm's forward reshapes with must follow.
    attn.num_heads = heads
    attn.head_dim = attn.qkv.out_features // (3 * heads)
    attn.attn_dim = heads * attn.head_dim


def prune(
    model: VisionTransformer,
    settings: Prune,
    example: torch.Tensor,
    calibration: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    *,
    after_round: Callable[[int], None] | None = None,
) -> list[list[list[int]]]:
    """Remove `settings.ratio` of the heads and MLP channels in place, in `settings.rounds` rounds: the same share
    from every block (`allocation` uniform) or the least important across all blocks (`global`, equal totals, so
    equal MACs; by Taylor scores in `GLOBAL_STEPS` steps a round), ranked by `importance`; MLP widths are multiples
    of `round_to`; `prune_embed` narrows the residual stream too.

    `calibration` batches give the gradients Taylor importance needs; `after_round(r)` runs after round r
    (e.g. to measure it). Returns the layout after each round.
    """
    ratio, importance, round_to = settings.ratio, settings.importance, settings.round_to
    per_round = GLOBAL_STEPS if settings.allocation == "global" and importance == "taylor" else 1
    steps = settings.rounds * per_round
    hidden = min(block.mlp.fc1.out_features for block in model.blocks)
    if round_to > hidden:  # the schema checks the range; the width is this model's
        raise VitexpError(f"task.round_to={round_to} must be at most the MLP width ({hidden})")
    # Only head groups (qkv rows and proj columns) and MLP hidden channels are roots; the embedding width
    # is kept unless asked for, since every residual connection shares it.
    ignored = [model.head] + (
        []
        if settings.prune_embed
        else [model.patch_embed.proj] + [b.attn.proj for b in model.blocks] + [b.mlp.fc2 for b in model.blocks]
    )
    tokens = {
        p: p.dim() - 1 for name, p in model.named_parameters() if name in ("cls_token", "dist_token", "pos_embed")
    }
    depth, heads0, hidden0, embed0 = len(model.blocks), *layout_of(model)[0], embed_width(model)
    layouts = []
    for step in range(1, steps + 1):
        # after step s, (1 - ratio * s / steps) of the original heads and channels are kept
        share = ratio * step / steps
        target = uniform_layout(depth, heads0, hidden0, share, round_to)
        if importance == "taylor":
            model.zero_grad()
            for images, targets in calibration or []:
                nn.functional.cross_entropy(model(images), targets).backward()
        if settings.allocation == "global":
            totals = [sum(column) for column in zip(*target)]
            target = global_layout(block_scores(model, importance, example, tokens), *totals, round_to)
        in_width = model.blocks[0].attn.qkv.in_features
        embed = 1 - (round(embed0 * (1 - share)) + 0.5) / in_width if settings.prune_embed else 0
        _prune_to(model, target, importance, example, ignored, tokens, max(0.0, embed))
        model.zero_grad(set_to_none=True)
        if step % per_round == 0:
            layouts.append(layout_of(model))
            if after_round is not None:
                after_round(step // per_round)
    return layouts


def block_scores(
    model: VisionTransformer, importance: str, example: torch.Tensor, tokens: dict[nn.Parameter, int]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per block: the importance of each attention head and of each MLP hidden channel, on the scale `RANKING`
    compares them across blocks with (Taylor reads the gradients already in the model)."""
    graph = tp.DependencyGraph().build_dependency(
        model, example_inputs=example, unwrapped_parameters=list(tokens.items())
    )
    scorer, scores = RANKING[importance](), []
    for block in model.blocks:
        attn, fc1 = block.attn, block.mlp.fc1
        # a head group is rooted at proj's input columns, as torch-pruning's own attention pruning roots it
        heads = graph.get_pruning_group(attn.proj, tp.prune_linear_in_channels, list(range(attn.proj.in_features)))
        channels = graph.get_pruning_group(fc1, tp.prune_linear_out_channels, list(range(fc1.out_features)))
        scores.append((scorer(heads).view(attn.num_heads, -1).mean(1).cpu(), scorer(channels).cpu()))
    return scores


def _prune_to(
    model: VisionTransformer,
    layout: Sequence[Sequence[int]],
    importance: str,
    example: torch.Tensor,
    ignored: list[nn.Module],
    tokens: dict[nn.Parameter, int],
    embed_ratio: float,
) -> None:
    """Shrink every block to its [heads, MLP width] of `layout`, keeping the most important heads and channels."""
    attentions = [block.attn for block in model.blocks]
    # Exact counts from torch-pruning: it removes ceil(r * heads) heads and keeps int((1 - r) * channels) channels,
    # hence the small offsets. qkv gets a positive channel ratio only so that its group is visited for its heads;
    # prune_head_dims=False keeps every head's width.
    channels = {b.mlp.fc1: max(0.0, 1 - (w + 0.5) / b.mlp.fc1.out_features) for b, (_, w) in zip(model.blocks, layout)}
    heads = {
        b.attn.qkv: max(0.0, (b.attn.num_heads - h) / b.attn.num_heads - 1e-6)
        for b, (h, _) in zip(model.blocks, layout)
    }
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=IMPORTANCE[importance](),
        pruning_ratio=embed_ratio,
        pruning_ratio_dict={**channels, **{a.qkv: 0.5 for a in attentions}},
        ignored_layers=ignored,
        num_heads={a.qkv: a.num_heads for a in attentions},
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio_dict=heads,
        unwrapped_parameters=list(tokens.items()),
    )
    pruner.step()
    for attn in attentions:
        _set_heads(attn, pruner.num_heads[attn.qkv])
