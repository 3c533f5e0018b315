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


def _randomised(model):
    with torch.no_grad():  # non-trivial layer scales, tokens and positions
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.eval()


def _timm_cls(net, x):
    with torch.no_grad():
        return net.forward_features(x)[:, 0]


@pytest.mark.parametrize("arch", ["vit_small_patch14_reg4_dinov2", "vit_small_patch14_dinov2"])
def test_a_dinov2_student_exports_what_transformers_loads_with_the_same_cls(tmp_path, arch):
    import timm

    from g2l_student.hf_export import hf_export_blocker, write_hf_export

    torch.manual_seed(0)
    net = _randomised(timm.create_model(arch, num_classes=0, img_size=42, depth=2))
    assert hf_export_blocker(net) is None
    write_hf_export(net, tmp_path / "hf", 42, [0.7, 0.6, 0.7], [0.2, 0.25, 0.15])
    model = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
    expected = "Dinov2WithRegistersModel" if "reg4" in arch else "Dinov2Model"
    assert type(model).__name__ == expected
    x = torch.randn(3, 3, 42, 42)
    with torch.no_grad():
        ours = model(pixel_values=x).pooler_output
    np.testing.assert_allclose(ours.numpy(), _timm_cls(net, x).numpy(), atol=1e-4, rtol=0)
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    assert list(processor.image_mean) == [0.7, 0.6, 0.7] and list(processor.image_std) == [0.2, 0.25, 0.15]
    image = (np.random.default_rng(0).random((60, 50, 3)) * 255).astype(np.uint8)
    assert processor(image, return_tensors="pt")["pixel_values"].shape == (1, 3, 42, 42)


def test_students_without_a_dinov2_architecture_say_why_they_have_no_hf_export():
    import timm

    from g2l_student.hf_export import hf_export_blocker

    with torch.device("meta"):
        assert "layer scale" in hf_export_blocker(timm.create_model("vit_tiny_patch16_224", num_classes=0))
        assert "SwiGLU" in hf_export_blocker(timm.create_model("vit_giant_patch14_dinov2", num_classes=0))
        assert "CLS" in hf_export_blocker(timm.create_model("resnet18", num_classes=0))


def test_a_run_started_from_hibou_layout_exports_hf_timm_and_a_speed_line(built_cache, tmp_path):
    """The distilled student comes out in its starting checkpoint's format; timm, transformers and
    `g2l embed` give the same CLS, and the model card times the student beside its teacher."""
    from typer.testing import CliRunner

    from cli.main import app
    from g2l_student.config import FitConfig
    from g2l_student.evaluation.embedder import load_embedding_model
    from g2l_student.train import fit

    _hf_checkpoint(tmp_path / "hibou", 28)
    run = tmp_path / "run"
    fit(FitConfig(cache=str(built_cache), out=str(run), student="vit_large_patch14_reg4_dinov2",
                  student_weights=str(tmp_path / "hibou"), img_size=28, steps=3, batch_size=8,
                  num_workers=0, val_fraction=0.34, progress=False))
    # the converted shape (64 wide, 2 blocks, 4 heads) is recorded, so the timm export rebuilds it
    res = CliRunner().invoke(app, ["student", "export", str(run), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    export = run / "export"
    config = json.loads((export / "config.json").read_text())
    assert config["model_args"]["embed_dim"] == 64 and config["model_args"]["num_heads"] == 4
    timm_model = load_embedding_model(str(run))
    hf = transformers.AutoModel.from_pretrained(export / "hf").eval()
    assert type(hf).__name__ == "Dinov2WithRegistersModel"
    mean = torch.tensor(config["pretrained_cfg"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(config["pretrained_cfg"]["std"]).view(1, 3, 1, 1)
    assert config["pretrained_cfg"]["mean"] == [0.7, 0.6, 0.7]  # Hibou's own preprocessing, carried through
    views = torch.rand(4, 3, 28, 28)
    with torch.no_grad():
        ours = hf(pixel_values=(views - mean) / std).pooler_output
    np.testing.assert_allclose(ours.numpy(), timm_model.embed(views).numpy(), atol=1e-4, rtol=0)
    assert "AutoModel.from_pretrained" in (export / "LOAD.md").read_text()
    # eva.yaml: the backbone kaiko-eva's TimmModel wrapper builds exactly as it calls timm
    import timm
    import yaml

    block = yaml.safe_load((export / "eva.yaml").read_text())["backbone"]
    assert block["class_path"] == "eva.vision.models.wrappers.TimmModel"
    args = block["init_args"]
    eva_net = timm.create_model(args["model_name"], pretrained=True, **args["model_kwargs"],
                                pretrained_cfg={"file": args["checkpoint_path"], "num_classes": 0}).eval()
    with torch.no_grad():
        eva_cls = eva_net((views - mean) / std)
    np.testing.assert_allclose(eva_cls.numpy(), ours.numpy(), atol=1e-4, rtol=0)
    env = dict(line.split("=", 1) for line in (export / "eva.env").read_text().splitlines())
    assert env["IN_FEATURES"] == "64" and env["RESIZE_DIM"] == "28" and env["NORMALIZE_MEAN"] == "'[0.7, 0.6, 0.7]'"
    # speed: student and teacher measured here, at batch 64, on the CPU the export ran on
    student, teacher = config["g2l"]["speed"]
    assert student["role"] == "student" and teacher["role"] == "teacher"
    assert student["batch"] == 64 and student["measured"] and teacher["measured"]
    assert student["images_per_second"] > 0 and 0 < student["params_m"] < teacher["params_m"]
    card = (export / "README.md").read_text()
    assert "## Speed" in card and "cores" in card and f"| {student['model']} | student | 28 |" in card


def test_a_teacher_too_slow_to_time_here_is_estimated_from_its_flops():
    from g2l_student.speed import Speed, teacher_speed

    student = Speed("s", "student", 224, 300.0, 100.0, 2.0, 64, True, "cpu (2 cores)", "fp32")
    row = teacher_speed("h-optimus-0", 224, torch.device("cpu"), student)  # 608 GFLOPs: ~5 h a batch here
    assert not row.measured and row.device == "cpu (2 cores)"
    assert row.images_per_second == pytest.approx(2.0 * 100.0 / 608.349, rel=1e-3)
    assert 1100 < row.params_m < 1200  # ViT-g/14, counted on the meta device
