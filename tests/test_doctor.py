"""`g2l doctor` answers offline: hub access told apart, weights fit from headers, GPUs, disk, folder."""

import json

import httpx
import pytest
import timm
import torch
from huggingface_hub import errors
from safetensors.torch import save_file
from typer.testing import CliRunner

from cli.main import app
from g2l_cache import G2LError
from g2l_student import doctor
from g2l_student.doctor import DoctorConfig, run_doctor


def _hub_error(kind):
    response = httpx.Response(403 if kind == "gated" else 404, request=httpx.Request("GET", "https://huggingface.co"))
    return {"gated": errors.GatedRepoError("no access", response=response),
            "missing": errors.RepositoryNotFoundError("not found", response=response),
            "offline": httpx.ConnectError("Name or service not known")}[kind]


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "hub"


@pytest.mark.parametrize("kind, words", [("gated", "no access"), ("missing", "no such repository"),
                                         ("offline", "cannot be reached")])
def test_hub_access_tells_gated_missing_and_offline_apart(empty_hub_cache, monkeypatch, kind, words):
    def refuse(self, repo_id, **kwargs):
        raise _hub_error(kind)

    monkeypatch.setattr("huggingface_hub.HfApi.auth_check", refuse)
    check = doctor.hub_access("bioptimus/H-optimus-0", "teacher h-optimus-0")
    assert check.status == "fail" and words in check.detail
    assert {"gated": "request access", "missing": "check the name", "offline": "hf download"}[kind] in check.fix


def test_hub_access_passes_with_access_or_from_the_local_cache_offline(empty_hub_cache, monkeypatch):
    monkeypatch.setattr("huggingface_hub.HfApi.auth_check", lambda self, repo_id, **kw: None)
    assert doctor.hub_access("histai/hibou-L", "student").status == "ok"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check = doctor.hub_access("histai/hibou-L", "student")
    assert check.status == "fail" and "cannot be reached" in check.detail  # offline, nothing cached
    snapshot = empty_hub_cache / "models--histai--hibou-L" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(b"x")
    (empty_hub_cache / "models--histai--hibou-L" / "refs").mkdir()
    (empty_hub_cache / "models--histai--hibou-L" / "refs" / "main").write_text("abc123")
    check = doctor.hub_access("histai/hibou-L", "student")
    assert check.status == "ok" and "local hub cache" in check.detail


def test_a_local_weights_file_is_checked_for_fit_from_its_header(tmp_path):
    tiny = timm.create_model("vit_tiny_patch16_224", num_classes=0)
    save_file(tiny.state_dict(), str(tmp_path / "tiny.safetensors"))
    torch.save(tiny.state_dict(), tmp_path / "tiny.pth")
    for name in ("tiny.safetensors", "tiny.pth"):
        check = doctor.teacher_checks("vit_tiny_patch16_224", str(tmp_path / name))[0]
        assert check.status == "ok" and "tensors fit" in check.detail
    check = doctor.teacher_checks("vit_small_patch16_224", str(tmp_path / "tiny.safetensors"))[0]
    assert check.status == "fail" and "of another shape" in check.detail and "cls_token (1, 1, 192) vs (1, 1, 384)" in check.detail
    check = doctor.teacher_checks("vit_tiny_patch16_224", str(tmp_path / "none.safetensors"))[0]
    assert check.status == "fail" and "does not exist" in check.detail
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    assert doctor.teacher_checks("vit_tiny_patch16_224", str(tmp_path / "junk.safetensors"))[0].status == "fail"


def test_a_transformers_dinov2_student_folder_is_checked_through_the_conversion(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Dinov2WithRegistersConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                 image_size=56, patch_size=14, num_register_tokens=4)
    transformers.Dinov2WithRegistersModel(cfg).save_pretrained(tmp_path / "hibou")
    check = doctor.student_checks("vit_large_patch14_reg4_dinov2", str(tmp_path / "hibou"))[0]
    assert check.status == "ok", check
    config = json.loads((tmp_path / "hibou" / "config.json").read_text())
    (tmp_path / "hibou" / "config.json").write_text(json.dumps({**config, "hidden_size": 128}))
    check = doctor.student_checks("vit_large_patch14_reg4_dinov2", str(tmp_path / "hibou"))[0]
    assert check.status == "fail" and "of another shape" in check.detail


def _plan(folder, total):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plan.json").write_text(json.dumps({"disk_bytes": {"tiles": total, "targets": 0, "tables": 0,
                                                                 "shard_index": 0, "qc_images": 0, "total": total}}))
    return folder / "plan.json"


def test_gpus_disk_and_output_folder(tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only answers")
    assert doctor.gpu_check(None).status == "warn"
    assert doctor.gpu_check(8).status == "fail" and "the run wants 8" in doctor.gpu_check(8).detail
    assert doctor.disk_check(str(_plan(tmp_path / "small", 10_000))).status == "ok"
    big = doctor.disk_check(str(_plan(tmp_path / "big", 10**18)))
    assert big.status == "fail" and "needs" in big.detail
    (tmp_path / "bad.json").write_text("{}")
    assert "not a `g2l cache plan` output" in doctor.disk_check(str(tmp_path / "bad.json")).detail
    assert doctor.writable_check(str(tmp_path / "new" / "out")).status == "ok"
    (tmp_path / "file").write_text("")
    assert doctor.writable_check(str(tmp_path / "file" / "out")).status == "fail"

    def read_only(*args, **kwargs):
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(doctor.tempfile, "NamedTemporaryFile", read_only)
    check = doctor.writable_check(str(tmp_path))
    assert check.status == "fail" and "Read-only" in check.detail
    assert doctor.cpu_check(64).status == "warn"


def test_the_command_exits_non_zero_only_when_something_blocks(tmp_path):
    tiny = timm.create_model("vit_tiny_patch16_224", num_classes=0)
    save_file(tiny.state_dict(), str(tmp_path / "tiny.safetensors"))
    plan = _plan(tmp_path / "cache", 1000)
    runner = CliRunner()
    ok = runner.invoke(app, ["doctor", "--teacher", "vit_tiny_patch16_224", "--teacher-weights",
                             str(tmp_path / "tiny.safetensors"), "--plan", str(plan)])
    assert ok.exit_code == 0, ok.output
    assert "nothing blocks this run" in ok.output and "output folder" in ok.output and "free disk" in ok.output
    blocked = runner.invoke(app, ["doctor", "--teacher", "vit_small_patch16_224", "--teacher-weights",
                                  str(tmp_path / "tiny.safetensors"), "--gpus", "64"])
    assert blocked.exit_code == 1 and "FAIL" in blocked.output and "2 check(s) block" in blocked.output
    with pytest.raises(G2LError, match="one --teacher-weights per --teacher"):
        run_doctor(DoctorConfig(teacher=["uni", "virchow2"], teacher_weights=["a.safetensors"]))
    assert runner.invoke(app, ["doctor"]).exit_code == 2
