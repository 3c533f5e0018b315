"""Every teacher preset is its published model; hub failures are told apart; a misfit names its tensors."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import httpx
import pytest
import timm
import torch

from g2l_cache.errors import G2LError
from g2l_cache.teachers import PRESET_NAMES, TeacherSpec, get_preset, load_teacher, model_kwargs, split_embedding
from g2l_student.model import build_student

FIXTURES = Path(__file__).parent / "fixtures" / "teachers"


def _published(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def _resolve(kwargs: dict) -> dict:
    out = {}
    for key, value in kwargs.items():
        module, _, attr = value.rpartition(".")
        out[key] = getattr(importlib.import_module(module), attr)
    return out


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_every_preset_builds_the_published_model(name):
    published = _published(name)
    assert published["preset"] == name and published["source"].startswith("https://huggingface.co/")
    config = published["config"]
    preset = get_preset(name)
    size = config["pretrained_cfg"]["input_size"][-1]
    with torch.device("meta"):
        theirs = timm.create_model(config["architecture"], **config["model_args"], **_resolve(published["card_kwargs"]))
        ours = timm.create_model(preset.arch, **model_kwargs(preset, preset.input_size))
        feats = ours.forward_features(torch.empty(1, 3, size, size))
        emb, patch = split_embedding(ours, feats, preset.embedding)
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    published_sd = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert mine == published_sd, {k: (mine.get(k), published_sd.get(k)) for k in set(mine) | set(published_sd)
                                  if mine.get(k) != published_sd.get(k)}
    assert preset.input_size == size
    assert list(preset.mean) == config["pretrained_cfg"]["mean"]
    assert list(preset.std) == config["pretrained_cfg"]["std"]
    assert preset.embedding == published["embedding"]
    width = theirs.num_features
    assert emb.shape[1] == width * (2 if published["embedding"] == "cls+mean_patch" else 1)
    assert patch.shape[1] == width


def test_virchow2_and_h0_mini_embeddings_are_cls_and_mean_patch():
    # the two whose cards define the embedding as CLS (+) mean patch token
    assert get_preset("virchow2").embedding == get_preset("h0-mini").embedding == "cls+mean_patch"


def _raise_from_hub(monkeypatch, exc: BaseException) -> None:
    def fake_download(*args, **kwargs):
        raise exc
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", fake_download)


def _http_error(cls, status: int):
    request = httpx.Request("GET", "https://huggingface.co/x/resolve/main/model.safetensors")
    return cls(f"{status} error", response=httpx.Response(status, request=request))


def test_a_missing_repository_a_gated_one_and_no_network_are_three_messages(monkeypatch):
    from huggingface_hub import errors

    spec = TeacherSpec("h-optimus-0", precision="fp32")
    messages = {}
    for kind, exc in [("missing", _http_error(errors.RepositoryNotFoundError, 404)),
                      ("gated", _http_error(errors.GatedRepoError, 403)),
                      ("offline", RuntimeError("Cannot send a request, as the client has been closed."))]:
        _raise_from_hub(monkeypatch, exc)
        with pytest.raises(G2LError) as info:
            with torch.device("meta"):
                load_teacher(spec)
        messages[kind] = str(info.value)
    for message in messages.values():  # the preset, its hub id, and what to do
        assert "h-optimus-0" in message and "bioptimus/H-optimus-0" in message
        assert "--teacher-weights" in message and "--random-init" in message
    assert "there is no hub repository bioptimus/H-optimus-0" in messages["missing"]
    assert "gated" in messages["gated"] and "Request access on https://huggingface.co/bioptimus/H-optimus-0" in messages["gated"]
    assert "cannot be reached" in messages["offline"] and "hf download bioptimus/H-optimus-0" in messages["offline"]
    assert len(set(messages.values())) == 3


def test_a_plain_timm_student_asks_for_timms_own_pretrained_tag(monkeypatch):
    asked = []

    def fake_download(repo_id, filename, **kwargs):
        asked.append(repo_id)
        raise _http_error(__import__("huggingface_hub").errors.RepositoryNotFoundError, 404)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", fake_download)
    with pytest.raises(G2LError, match="vit_tiny_patch16_224.augreg_in21k_ft_in1k"):
        build_student("vit_tiny_patch16_224", 32, {"cls": 8})
    assert asked and all(repo == "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k" for repo in asked)


def test_weights_that_do_not_fit_name_the_tensors_and_shapes(tmp_path):
    from safetensors.torch import save_file

    small = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32)
    save_file(small.state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(G2LError) as info:
        load_teacher(TeacherSpec("vit_small_patch16_224", weights=str(tmp_path / "w.safetensors"),
                                 precision="fp32"), img_size=32)
    message = str(info.value)
    assert "size mismatch for cls_token" in message and "torch.Size([1, 1, 192])" in message
    assert "torch.Size([1, 1, 384])" in message and "more" in message


def test_the_known_costs_of_the_presets_are_what_the_meta_device_counts():
    from g2l_cache.costs import KNOWN_PROFILES, _meta_profile

    for (name, size, train), known in KNOWN_PROFILES.items():
        assert _meta_profile(name, size, train) == known, name
