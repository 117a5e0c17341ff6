"""Model builders, rebuild from `arch`, and the reported statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.builders import model_of
from tests.conftest import compose_config
from vitexp import VitexpError
from vitexp.models import BUILDERS, Arch, arch_of, build_from_arch, count_macs, count_params, inference_img_per_s


def _same_function(model: nn.Module, x: torch.Tensor) -> None:
    clone = build_from_arch(arch_of(model)).eval()
    clone.load_state_dict(model.state_dict())
    assert torch.equal(model.eval()(x), clone(x))


def test_rebuild_from_arch_gives_the_same_function():
    _same_function(model_of(compose_config("data=cifar10").model), torch.randn(3, 3, 32, 32))


def test_baseline_is_vit_lite_7_4_and_patch8_has_a_quarter_of_the_tokens():
    base = model_of(compose_config("data=cifar10").model)
    p8 = model_of(compose_config("data=cifar10", "model=patch8").model)
    assert (len(base.blocks), base.embed_dim, base.blocks[0].attn.num_heads) == (7, 256, 4)
    assert base.patch_embed.num_patches == 64 and p8.patch_embed.num_patches == 16
    assert 3.0e6 < count_params(base) < 4.0e6
    assert 3.0 < count_macs(base) / count_macs(p8) < 4.5


def test_one_builder_per_source_of_model():
    # a vitexp ViT (pruned or not), DeiT's distilled ViT, and any timm model by name
    assert sorted(BUILDERS) == ["timm", "vit", "vit_distilled"]


def test_a_pruned_vit_is_a_vit_with_a_layout_and_rebuilds():
    model = model_of(compose_config("data=cifar10", "model=pruned", "model.ratio=0.5", "model.depth=2").model)
    arch = arch_of(model)
    assert arch.builder == "vit" and arch.kwargs["layout"] == [[2, 256], [2, 256]]
    _same_function(model, torch.randn(2, 3, 32, 32))
    with pytest.raises(VitexpError, match=r"^model\.ratio=1\.5 is not valid: it must be a number in \[0, 1\)$"):
        build_from_arch(arch.with_kwargs(ratio=1.5))


def test_the_teacher_is_a_timm_model_by_name_with_a_small_input_stem():
    teacher = model_of(compose_config("data=cifar10", "task=distill").task.teacher)
    arch = arch_of(teacher)
    assert (arch.builder, arch.name, arch.kwargs["small_input"]) == ("timm", "resnet18", True)
    assert teacher.conv1.kernel_size == (3, 3) and isinstance(teacher.maxpool, nn.Identity)
    _same_function(teacher, torch.randn(2, 3, 32, 32))


def test_unknown_builder_is_refused():
    for builder in ("os.system", "cnn", "pruned_vit"):
        with pytest.raises(VitexpError, match="unknown architecture"):
            build_from_arch(Arch(builder, "x", {}))


def test_inference_throughput_is_positive():
    model = model_of(compose_config("debug=fast").model)
    assert inference_img_per_s(model, batch_size=4, iters=1) > 0
