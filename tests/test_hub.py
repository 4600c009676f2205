"""Loading through huggingface_hub: the cache layout, overrides, and errors that say how to fix them."""

import json
import shutil

import pytest
import torch
from helpers import put_in_cache

from mm2latent import FacePipeline
from mm2latent.errors import WeightsNotFoundError
from mm2latent.pipelines import hub
from mm2latent.pipelines.hub import (
    DEFAULT_COMPONENTS,
    apply_env_overrides,
    parse_repo_reference,
    resolve_component,
)


@pytest.fixture(scope="module")
def saved_tiny(tiny_pipe, tmp_path_factory):
    return tiny_pipe.save_pretrained(tmp_path_factory.mktemp("saved") / "tiny")


def test_load_from_the_hub_cache_layout(tiny_pipe, saved_tiny, hub_cache, mask_path):
    put_in_cache(hub_cache, "someone/mm2latent-tiny", saved_tiny)
    pipe = FacePipeline.from_pretrained("someone/mm2latent-tiny", device="cpu")
    pipe.show_progress = False
    expected = tiny_pipe("she is smiling", mask=mask_path, seed=8)
    assert torch.equal(pipe("she is smiling", mask=mask_path, seed=8).latents, expected.latents)


def test_components_in_other_repos_and_env_overrides(tiny_pipe, saved_tiny, hub_cache, tmp_path, monkeypatch, mask_path):
    # The model repo keeps M and T; the generator lives in a repository of its own.
    model = tmp_path / "model"
    shutil.copytree(saved_tiny, model)
    generator_repo = tmp_path / "generator"
    shutil.move(model / "generator", generator_repo)
    manifest = json.loads((model / "mm2latent.json").read_text())
    manifest["components"]["generator"] = {"repo_id": "gan-lab/tiny-stylegan2", "revision": "main",
                                           "allow_patterns": ["*.json", "*.safetensors"],
                                           "env": "MM2LATENT_GENERATOR_REPO"}
    (model / "mm2latent.json").write_text(json.dumps(manifest))
    put_in_cache(hub_cache, "someone/split-model", model)

    with pytest.raises(WeightsNotFoundError) as info:
        FacePipeline.from_pretrained("someone/split-model", device="cpu")
    message = str(info.value)
    assert "gan-lab/tiny-stylegan2" in message and "generator" in message and "HF_HUB_OFFLINE" in message

    put_in_cache(hub_cache, "other-lab/stylegan2", generator_repo)
    monkeypatch.setenv("MM2LATENT_GENERATOR_REPO", "other-lab/stylegan2@main")
    pipe = FacePipeline.from_pretrained("someone/split-model", device="cpu")
    pipe.show_progress = False
    assert torch.equal(pipe("a man", mask=mask_path, seed=1).latents, tiny_pipe("a man", mask=mask_path, seed=1).latents)

    monkeypatch.setenv("MM2LATENT_GENERATOR_REPO", str(generator_repo))
    assert FacePipeline.from_pretrained("someone/split-model", device="cpu").generator.num_ws == tiny_pipe.generator.num_ws


def test_manifest_component_in_its_native_format(tiny_pipe, saved_tiny, hub_cache, tmp_path):
    """A manifest may name the generator as a public rosinality .pt; the pipeline loads it unchanged."""
    model = tmp_path / "model"
    shutil.copytree(saved_tiny, model)
    shutil.rmtree(model / "generator")
    manifest = json.loads((model / "mm2latent.json").read_text())
    manifest["components"]["generator"] = {"repo": "gan-lab/stylegan2", "path": "weights/ffhq.pt", "format": "rosinality"}
    (model / "mm2latent.json").write_text(json.dumps(manifest))
    upload = tmp_path / "upload"
    (upload / "weights").mkdir(parents=True)
    generator = tiny_pipe.generator
    torch.save({"g_ema": generator.rosinality_state_dict(), "latent_avg": generator.latent_avg}, upload / "weights" / "ffhq.pt")
    put_in_cache(hub_cache, "gan-lab/stylegan2", upload)
    loaded = FacePipeline.from_pretrained(model, device="cpu").generator.state_dict()
    expected = generator.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)  # the conversion copies the tensors


def test_missing_repo_names_the_repo_and_the_fix(hub_cache):
    with pytest.raises(WeightsNotFoundError, match="nobody/nothing") as info:
        FacePipeline.from_pretrained("nobody/nothing", device="cpu")
    assert "mm2latent.json" in str(info.value) and "tiny" in str(info.value)
    assert "`hf download nobody/nothing mm2latent.json`" in str(info.value) and "huggingface-cli" not in str(info.value)


def test_unreachable_hub_is_detected_at_once_and_the_cache_still_serves(hub_cache, tmp_path, monkeypatch):
    """Without HF_HUB_OFFLINE and without network: one short probe, then only the local cache (no retries)."""
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    monkeypatch.setattr(hub, "_hub_status_cache", {})
    probes = []
    real_session = hub.get_session
    monkeypatch.setattr(hub, "get_session", lambda: probes.append(1) or real_session())
    lookups = []  # (function, local_files_only) of every huggingface_hub download call
    for name in ("hf_hub_download", "snapshot_download"):
        real = getattr(hub, name)
        monkeypatch.setattr(hub, name, lambda *args, _name=name, _real=real, **kwargs: lookups.append(
            (_name, kwargs.get("local_files_only"))) or _real(*args, **kwargs))
    with pytest.raises(WeightsNotFoundError) as info:
        hub.load_manifest("nobody/nothing")
    message = str(info.value)
    # After the failed probe the manifest is looked up in the cache only (huggingface_hub alone retries ~23 s).
    assert lookups == [("hf_hub_download", True)] and len(probes) == 1
    assert "cannot be reached" in message and "`hf download nobody/nothing mm2latent.json`" in message
    assert "huggingface-cli" not in message

    folder = tmp_path / "scheduler-repo"
    folder.mkdir()
    (folder / "scheduler_config.json").write_text("{}")
    put_in_cache(hub_cache, "someone/scheduler", folder)
    spec = {"repo_id": "someone/scheduler", "revision": "main", "allow_patterns": ["*.json"]}
    assert (resolve_component("scheduler", spec, None, None) / "scheduler_config.json").is_file()
    assert len(probes) == 1 and lookups[1:] == [("snapshot_download", True)]  # the probe's answer is reused


def test_local_folder_without_manifest(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="mm2latent.json"):
        FacePipeline.from_pretrained(tmp_path, device="cpu")


def test_manifest_must_name_required_components(saved_tiny, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(saved_tiny, broken)
    manifest = json.loads((broken / "mm2latent.json").read_text())
    del manifest["components"]["unet"]
    (broken / "mm2latent.json").write_text(json.dumps(manifest))
    with pytest.raises(WeightsNotFoundError, match="unet"):
        FacePipeline.from_pretrained(broken, device="cpu")


def test_repo_references(monkeypatch):
    assert parse_repo_reference("a/b@v1.0") == ("a/b", "v1.0")
    assert parse_repo_reference("a/b") == ("a/b", None)
    spec = DEFAULT_COMPONENTS["unet"]
    assert apply_env_overrides(spec) == spec
    monkeypatch.setenv("MM2LATENT_SD_REPO", "my/sd15@abc")
    overridden = apply_env_overrides(spec)
    assert (overridden["repo_id"], overridden["revision"], overridden["subfolder"]) == ("my/sd15", "abc", "unet")
    assert all(spec.get("allow_patterns") for spec in DEFAULT_COMPONENTS.values() if "repo_id" in spec)
    # Only safetensors weights are ever requested.
    patterns = [p for spec in DEFAULT_COMPONENTS.values() for p in spec.get("allow_patterns", [])]
    assert not any(p.endswith((".bin", ".ckpt", ".pt", ".pth")) for p in patterns)


def test_unpublished_project_repositories_are_skipped_without_a_request(monkeypatch):
    from mm2latent.pipelines import hub

    def no_request(*args, **kwargs):
        raise AssertionError("a published() / model_plan() call must not touch the network")

    monkeypatch.setattr(hub, "hub_status", no_request)
    assert not hub.published("mm2latent/mm2latent-celebahq")
    assert hub.published("timm/vgg16.tv_in1k") and hub.published("someone/their-model@v2")
    plan = hub.model_plan("mm2latent/mm2latent-celebahq")
    assert plan.skipped and plan.load == "public" and "not published" in plan.sentence
    kept = hub.model_plan("someone/their-model")
    assert not kept.skipped and kept.load == "someone/their-model" and kept.sentence == ""
    repos = [spec.get("repo_id") or spec.get("repo") for spec in {**hub.DEFAULT_COMPONENTS, **hub.PUBLIC_COMPONENTS}.values()]
    assert all(hub.published(r) and r in hub.PUBLISHED_REPOS for r in repos if r)
