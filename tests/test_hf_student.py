"""A transformers DINOv2-with-registers checkpoint (the layout of Hibou-L) loads as the timm student."""

import json

import numpy as np
import pytest
import torch

from g2l_cache import G2LError
from g2l_student.model import build_student

transformers = pytest.importorskip("transformers")


def _hf_checkpoint(folder, image_size: int, registers: int = 4):
    """A small random Dinov2WithRegisters model saved as transformers saves it, with its preprocessing."""
    cfg = transformers.Dinov2WithRegistersConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                 image_size=image_size, patch_size=14,
                                                 num_register_tokens=registers, layerscale_value=0.5)
    torch.manual_seed(0)
    model = transformers.Dinov2WithRegistersModel(cfg).eval()
    with torch.no_grad():  # random, non-trivial values everywhere (layer scales and tokens included)
        for p in model.parameters():
            p.normal_(0, 0.05)
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.7, 0.6, 0.7], "image_std": [0.2, 0.25, 0.15]}))
    return model


@pytest.mark.parametrize("trained_at, used_at", [(56, 56), (42, 56)])
def test_a_transformers_dinov2_checkpoint_gives_the_same_cls_in_timm(tmp_path, trained_at, used_at):
    model = _hf_checkpoint(tmp_path / "hf", trained_at)
    assert (tmp_path / "hf" / "model.safetensors").exists()
    student = build_student("vit_large_patch14_reg4_dinov2", used_at, {"cls": 8},
                            weights=str(tmp_path / "hf"))
    assert student.embed_dim == 64 and len(student.backbone.blocks) == 2
    x = torch.rand(3, 3, used_at, used_at)
    mean = torch.tensor([0.7, 0.6, 0.7]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.15]).view(1, 3, 1, 1)
    assert torch.equal(student.mean, mean) and torch.equal(student.std, std)
    with torch.no_grad():
        reference = model(pixel_values=(x - mean) / std).pooler_output
        ours, _ = student.eval().embed(x)
    # positions resampled the way transformers interpolates them when the sizes differ
    np.testing.assert_allclose(ours.numpy(), reference.numpy(), atol=1e-4, rtol=0)
    # the weights file itself works too, and explicit mean/std win over the checkpoint's
    other = build_student("vit_large_patch14_reg4_dinov2", used_at, {"cls": 8},
                          weights=str(tmp_path / "hf" / "model.safetensors"), mean=[0.5] * 3, std=[0.5] * 3)
    assert torch.equal(other.mean, torch.full((1, 3, 1, 1), 0.5))
    torch.testing.assert_close(other.backbone.state_dict()["cls_token"], student.backbone.state_dict()["cls_token"])


def test_an_hf_checkpoint_and_bad_sizes_are_clear_errors(tmp_path):
    _hf_checkpoint(tmp_path / "hf", 56)
    with pytest.raises(G2LError, match="multiple of the student's patch size 14"):
        build_student("vit_large_patch14_reg4_dinov2", 50, {"cls": 8}, weights=str(tmp_path / "hf"))
    with pytest.raises(G2LError, match="does not exist"):
        build_student("vit_large_patch14_reg4_dinov2", 56, {"cls": 8}, weights=str(tmp_path / "none.safetensors"))
