"""Model builders, rebuild from `arch`, and the reported statistics."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import compose_config
from vitexp import VitexpError
from vitexp.models import arch_of, build_from_arch, count_macs, count_params, inference_img_per_s


def test_rebuild_from_arch_gives_the_same_function():
    model = instantiate(compose_config("data=cifar10").model).eval()
    clone = build_from_arch(arch_of(model)).eval()
    clone.load_state_dict(model.state_dict())
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(model(x), clone(x))


def test_baseline_is_vit_lite_7_4_and_patch8_has_a_quarter_of_the_tokens():
    base = instantiate(compose_config("data=cifar10").model)
    p8 = instantiate(compose_config("data=cifar10", "model=patch8").model)
    assert (len(base.blocks), base.embed_dim, base.blocks[0].attn.num_heads) == (7, 256, 4)
    assert base.patch_embed.num_patches == 64 and p8.patch_embed.num_patches == 16
    assert 3.0e6 < count_params(base) < 4.0e6
    assert 3.0 < count_macs(base) / count_macs(p8) < 4.5


def test_unknown_builder_is_refused():
    with pytest.raises(VitexpError, match="unknown architecture"):
        build_from_arch({"builder": "os.system", "name": "x", "kwargs": {}})


def test_inference_throughput_is_positive():
    model = instantiate(compose_config("debug=fast").model)
    assert inference_img_per_s(model, batch_size=4, iters=1) > 0
