"""``python -m mm2latent doctor``: every file of a model resolved and checked, offline, on Hub-cache fixtures."""

from __future__ import annotations

import json
import shutil

from helpers import bisenet_file, ir_se50_file, put_file_in_cache, rosinality_file

from mm2latent import doctor
from mm2latent.__main__ import main
from mm2latent.models.mapping import MappingNetwork
from mm2latent.pipelines import hub
from mm2latent.pipelines.hub import PUBLIC_COMPONENTS, resolve_component


def rows_by_component(rows):
    return {row.component: row for row in rows}


def test_public_preset_rows_tell_present_converted_mismatch_and_missing(hub_cache, tmp_path, capsys):
    generator, parser = PUBLIC_COMPONENTS["generator"], PUBLIC_COMPONENTS["face_parser"]
    put_file_in_cache(hub_cache, tmp_path, generator["repo"], generator["path"], rosinality_file()[0])
    # An IR-SE50 file where BiSeNet's 79999_iter.pth belongs (legacy format, like the real one).
    put_file_in_cache(hub_cache, tmp_path, parser["repo"], parser["path"], ir_se50_file()[0], legacy=True)

    rows = rows_by_component(doctor.check_model("public"))
    assert set(rows) == set(PUBLIC_COMPONENTS)
    assert rows["generator"].status == "present" and "converts on first use" in rows["generator"].detail
    assert "float32" in rows["generator"].detail
    assert rows["face_parser"].status == "mismatch" and "conv_out" in rows["face_parser"].detail
    assert "MM2LATENT_FACE_PARSER_REPO" in rows["face_parser"].fix
    assert rows["unet"].status == "missing" and "hf download stable-diffusion-v1-5" in rows["unet"].fix
    assert rows["lpips"].status == "missing" and "timm/vgg16.tv_in1k" in rows["lpips"].source

    resolve_component("generator", generator, None, None)  # converts once, as loading does
    assert rows_by_component(doctor.check_model("public"))["generator"].status == "converted"

    assert main(["doctor", "--preset", "public"]) == 1  # something is missing
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:3] == ["component", "status", "source"]
    assert all(name in table for name in PUBLIC_COMPONENTS)


def test_a_right_parser_file_is_present(hub_cache, tmp_path):
    spec = PUBLIC_COMPONENTS["face_parser"]
    put_file_in_cache(hub_cache, tmp_path, spec["repo"], spec["path"], bisenet_file()[0], legacy=True)
    row = doctor.check_component("face_parser", spec)
    assert row.status == "present" and row.fix == ""


def test_model_folder_keys_and_shapes_are_checked_against_its_config(tiny_pipe, tmp_path, hub_cache):
    folder = tiny_pipe.save_pretrained(tmp_path / "model")
    rows = rows_by_component(doctor.check_model(str(folder)))
    assert {row.status for row in rows.values()} == {"present"}, rows
    assert "float32" in rows["unet"].detail

    # M saved for another generator: its heads no longer fit the config.json next to them.
    config = dict(tiny_pipe.mapper._hub_mixin_config)
    shutil.rmtree(folder / "mapper")
    MappingNetwork(**{**config, "num_ws": config["num_ws"] + 2}).save_pretrained(folder / "mapper")
    (folder / "mapper" / "config.json").write_text(json.dumps(config))
    row = rows_by_component(doctor.check_model(str(folder)))["mapper"]
    assert row.status == "mismatch" and "another shape" in row.detail and row.fix


def test_unpublished_repositories_are_skipped_without_a_request(monkeypatch):
    def no_request(*args, **kwargs):
        raise AssertionError("the doctor must not ask the Hub about an unpublished repository")

    monkeypatch.setattr(hub, "hub_status", no_request)
    row = doctor.check_component("controlnet_mask", {"repo_id": "mm2latent/controlnet-celebamask-hq", "subfolder": ""})
    assert row.status == "skipped" and row.fix
