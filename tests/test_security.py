"""Security and resource limits of the Space (issue 15), through the HTTP API of a running app.

One server (``python app.py``, tiny preset, 127.0.0.1) serves the module. Its temporary folders
(``TMPDIR``, ``GRADIO_TEMP_DIR``) lie in the test's own folder, so the files it leaves can be counted,
and the test knows which server files are *not* uploads. Nothing waits on the clock: every check
reads the answer of a request or the server's state after it.
"""

from __future__ import annotations

import io
import json
import os
import re
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest
from helpers import huge_png, running_space
from PIL import Image, ImageDraw

from mm2latent.inputs.conditions import MAX_IMAGE_PIXELS, read_image_size

pytestmark = pytest.mark.slow

CACHE_MAX_FILES = 60
CACHE_MAX_MB = 2
MAX_SESSIONS = 5
MAX_UPLOAD_BYTES = 2_000_000
NOT_UPLOADED = "Only files uploaded to this Space can be used"
GRADIO_NOT_UPLOADED = "it was not uploaded by a user"  # Gradio's own refusal of a file with `meta`


# --------------------------------------------------------------------------------------------
# The server and raw HTTP
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    """(url, workdir, server process): the tiny Space with small, countable limits."""
    workdir = tmp_path_factory.mktemp("secure-space")
    (workdir / "tmp").mkdir()
    with running_space(workdir, MM2LATENT_MODEL_REPO="tiny", MM2LATENT_CACHE_EXAMPLES="off",
                       MM2LATENT_CACHE_MAX_FILES=str(CACHE_MAX_FILES), MM2LATENT_MAX_FILE_SIZE="2mb",
                       MM2LATENT_CACHE_MAX_MB=str(CACHE_MAX_MB), MM2LATENT_MAX_SESSIONS=str(MAX_SESSIONS),
                       TMPDIR=str(workdir / "tmp")) as url:
        yield url, workdir, server_process(workdir)


def server_process(workdir: Path) -> psutil.Process:
    """The `python app.py` child that runs in ``workdir``."""
    for child in psutil.Process().children(recursive=True):
        try:
            if Path(child.cwd()) == workdir and any(part.endswith("app.py") for part in child.cmdline()):
                return child
        except psutil.Error:
            continue
    raise RuntimeError(f"no app.py process runs in {workdir}")


@pytest.fixture(scope="module")
def client(space):
    from gradio_client import Client

    return Client(space[0], verbose=False, download_files=False)


def call(url: str, api_name: str, body: str | list) -> tuple[str, object]:
    """POST /gradio_api/call/<api_name> with a raw JSON body; returns (final event, its data).

    The body is sent as written, so it can hold what ``json.dumps`` cannot write (``1e400``).
    """
    if not isinstance(body, str):
        body = json.dumps({"data": body})
    request = urllib.request.Request(f"{url}gradio_api/call/{api_name}", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        event_id = json.load(response)["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/{api_name}/{event_id}", timeout=240) as response:
        stream = response.read().decode()
    event, data = None, None
    for line in stream.splitlines():
        if line.startswith("event: "):
            event = line[len("event: "):]
        elif line.startswith("data: ") and event in ("complete", "error"):
            data = json.loads(line[len("data: "):])
    return event, data


def error_message(url: str, api_name: str, body: str | list) -> str:
    event, data = call(url, api_name, body)
    assert event == "error", f"/{api_name} answered {event}: {str(data)[:300]}"
    message = (data or {}).get("error")
    assert message, f"/{api_name} failed without a message: {data}"
    return message


def file_data(path, meta: bool = True) -> dict:
    data = {"path": str(path)}
    return {**data, "meta": {"_type": "gradio.FileData"}} if meta else data


def canvas_of(file: dict) -> dict:
    return {"background": file, "layers": [], "composite": file, "id": None}


def generation(picture, seed=0, randomize=True, truncation=1.0) -> list:
    return ["A face.", picture, "fast", 20, "all", "mean", seed, randomize, truncation, 1, False, "ddgi"]


# Every endpoint that takes a file, with the request that puts `file` where the file goes.
FILE_ENDPOINTS = {
    "invert_photo": lambda file: [file, 0],
    "edit_photo": lambda file: [file, 0, "with glasses", None, False, 1.0, "all", "modulate", 0, 0],
    "generate_from_mask": lambda file: generation(canvas_of(file)),
    "generate_from_sketch": lambda file: generation(canvas_of(file)),
    "generate_from_active_tab": lambda file: ["mask", *generation(canvas_of(file))[:2], canvas_of(file),
                                              *generation(None)[2:]],
    "upload_mask": lambda file: [file],
    "upload_sketch": lambda file: [file],
    "sketch_from_photo": lambda file: [file, "thin"],
}


@pytest.fixture(scope="module")
def server_files(space, testdata) -> dict[str, Path]:
    """Files on the server that nobody uploaded: a face photo, a missing file, and ways to reach them."""
    _, workdir, _ = space
    private = workdir / "private"
    private.mkdir()
    face = private / "face.jpg"
    face.write_bytes((testdata / "photos" / "ffhq_0.jpg").read_bytes())
    upload_folder = workdir / "gradio"
    upload_folder.mkdir(exist_ok=True)
    link = upload_folder / "looks-uploaded.jpg"  # a symlink inside the upload folder, pointing out of it
    link.symlink_to(face)
    return {"face": face, "missing": private / "missing.jpg", "traversal": upload_folder / ".." / "private" / "face.jpg",
            "link": link}


# --------------------------------------------------------------------------------------------
# 1. No server file is readable through the API
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", sorted(FILE_ENDPOINTS))
def test_server_files_are_refused_alike_whether_or_not_they_exist(space, server_files, endpoint):
    url = space[0]
    request = FILE_ENDPOINTS[endpoint]
    for meta in (False, True):
        answers = {}
        for name in ("face", "missing", "traversal", "link"):
            path = str(server_files[name])
            message = error_message(url, endpoint, request(file_data(path, meta)))
            # The caller's own path comes back in Gradio's and pydantic's words (pydantic cuts it short).
            answers[name] = re.sub(r"input_value=.*?, input_type", "input_value=…, input_type",
                                   message.replace(path, "<path>"))
        assert answers["face"] == answers["missing"], answers  # no oracle on what exists
        for name, message in answers.items():
            refused = NOT_UPLOADED in message or GRADIO_NOT_UPLOADED in message or "'meta' field" in message
            assert refused, f"/{endpoint} {name} (meta={meta}): {message}"
            assert "No face" not in message and "does not exist" not in message, message


def test_a_photo_without_meta_is_not_sent_back(space, server_files):
    """The issue's reproduction: before, the 'aligned' output was the server's photo."""
    event, data = call(space[0], "invert_photo", [file_data(server_files["face"], meta=False), 0])
    assert event == "error" and NOT_UPLOADED in data["error"]
    assert "aligned" not in json.dumps(data) and ".webp" not in json.dumps(data)


def test_inline_image_data_is_refused(space, server_files):
    encoded = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    message = error_message(space[0], "invert_photo", [{"path": None, "url": encoded}, 0])
    assert "uploaded file" in message and "inline data" in message


def test_file_route_serves_uploads_only_and_never_sniffs(space, server_files):
    """/file= refuses server files (existing or not); what it serves is marked nosniff."""
    import httpx

    url = space[0]
    statuses = {name: httpx.get(f"{url}gradio_api/file={server_files[name]}").status_code
                for name in ("face", "missing")}
    assert statuses["face"] == statuses["missing"] and statuses["face"] >= 400, statuses
    page = b"<html><script>alert(document.domain)</script></html>"
    uploaded = httpx.post(f"{url}gradio_api/upload", files={"files": ("page.png", page, "image/png")}).json()[0]
    served = httpx.get(f"{url}gradio_api/file={uploaded}")
    assert served.status_code == 200 and served.content == page
    assert served.headers["x-content-type-options"] == "nosniff"


def test_api_description_shows_no_server_path(space, client):
    _, workdir, _ = space
    description = json.dumps(client.view_api(print_info=False, return_format="dict"))
    assert str(workdir) not in description and "/gradio_api/file=" not in description
    parameters = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/generate_from_mask"][
        "parameters"]
    mask = next(p for p in parameters if p["parameter_name"] == "mask")
    assert mask["parameter_has_default"] is False and mask["parameter_default"] is None


# --------------------------------------------------------------------------------------------
# 2. Huge images are refused before anything decodes them
# --------------------------------------------------------------------------------------------


def test_a_huge_image_is_refused_before_decoding_and_memory_stays_put(space, client, tmp_path):
    """13000 x 13000 (169 MP) in a 100-byte PNG, three times to every image input: RSS stays put.

    Decoded to RGBA, each would take 676 MB; the issue measured +0.4 to 1.3 GB per request.
    """
    from gradio_client import handle_file

    _, _, server = space
    bomb = huge_png(tmp_path / "bomb.png", 13_000, 13_000)
    file = handle_file(str(bomb))
    canvas = canvas_of(file)
    requests = {
        "/invert_photo": (file, 0), "/edit_photo": (file, 0, "x", None, False, 1.0, "all", "modulate", 0, 0),
        "/generate_from_mask": tuple(generation(canvas)), "/generate_from_sketch": tuple(generation(canvas)),
        "/upload_mask": (file,), "/upload_sketch": (file,), "/sketch_from_photo": (file, "thin"),
    }
    before = server.memory_info().rss
    for _ in range(3):
        for api_name, arguments in requests.items():
            with pytest.raises(Exception) as caught:
                client.predict(*arguments, api_name=api_name)
            assert "too large" in str(caught.value), f"{api_name}: {caught.value}"
            assert "bomb.png" in str(caught.value) and str(tmp_path) not in str(caught.value)
    grown_mb = (server.memory_info().rss - before) / 2**20
    assert grown_mb < 300, f"RSS grew by {grown_mb:.0f} MB over 21 refused 169-MP images"


def test_a_file_over_the_upload_limit_is_refused_in_words(space):
    import httpx

    url = space[0]
    response = httpx.post(f"{url}gradio_api/upload",
                          files={"files": ("big.png", b"\0" * (MAX_UPLOAD_BYTES + 100_000), "image/png")})
    assert response.status_code == 413 and "size" in response.text.lower(), response.text


# --------------------------------------------------------------------------------------------
# 3. Disk stays bounded
# --------------------------------------------------------------------------------------------


def files_under(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file() or path.is_symlink()]


def sketch_file(folder: Path, index: int) -> Path:
    """A different little sketch each time (a line at its own height), so no upload is a duplicate."""
    image = Image.new("L", (64, 64), 255)
    ImageDraw.Draw(image).line([(4, 2 + index % 60), (60, 2 + (index * 7) % 60)], fill=0, width=2)
    path = folder / f"sketch-{index}.png"
    image.save(path)
    return path


def test_two_hundred_calls_keep_the_file_count_bounded(space, client, tmp_path, testdata):
    """200 uploads (each leaves an upload and a new canvas in Gradio's cache), then generations and edits.

    Without limits that is 400+ cached files, one run folder per generation and a stray
    ``mm2latent-*.pt`` per edit; with them Gradio's cache stays near ``MM2LATENT_CACHE_MAX_FILES`` and
    the output store holds at most its newest run folders.
    """
    from gradio_client import handle_file

    _, workdir, _ = space
    cache, temp = workdir / "gradio", workdir / "tmp"
    sketches = tmp_path / "sketches"
    sketches.mkdir()
    for index in range(200):
        canvas = client.predict(handle_file(str(sketch_file(sketches, index))), api_name="/upload_sketch")
        assert Path(canvas["background"]["path"]).is_file()  # the newest output is never pruned away
    photo = handle_file(str(testdata / "photos" / "ffhq_1.jpg"))
    for seed in range(20):
        gallery, *_ = client.predict(*generation(None, seed=seed, randomize=False), api_name="/generate_from_mask")
        assert Path(gallery[0]["image"]["path"]).is_file()
    for _ in range(3):
        client.predict(photo, 0, "with glasses", None, False, 1.0, "all", "modulate", 0, 0, api_name="/edit_photo")

    cached = files_under(cache)
    # Kept on purpose (canvases' initial values, example inputs) + the cap + one event's own files.
    assert len(cached) <= CACHE_MAX_FILES + 40, f"{len(cached)} files in Gradio's cache"
    run_folders = [folder for store in temp.glob("mm2latent-space-*") for folder in store.iterdir() if folder.is_dir()]
    assert 1 <= len(run_folders) <= 16, f"{len(run_folders)} run folders in the output store"
    assert not list(temp.rglob("mm2latent-*.pt")) and not list(temp.glob("tmp*"))
    stray = [path for path in files_under(temp) if "mm2latent-space-" not in str(path)]
    assert not stray, stray[:5]


# --------------------------------------------------------------------------------------------
# 4-5. Every failing call says what was wrong
# --------------------------------------------------------------------------------------------


def test_every_bad_request_carries_a_message(space, client, tmp_path):
    from gradio_client import handle_file

    url = space[0]
    damaged = tmp_path / "damaged.png"
    buffer = io.BytesIO()
    Image.new("RGB", (300, 300), (90, 140, 200)).save(buffer, format="PNG")
    damaged.write_bytes(buffer.getvalue()[:300])  # a valid header, then the data stops
    uploaded = handle_file(str(damaged))
    raw = {  # (endpoint, JSON body as sent, words the message must hold)
        "seed 'abc'": ("generate_from_mask", generation(None, seed="abc", randomize=False), "seed must be"),
        "seed NaN": ("generate_from_mask", '{"data": ["A face.", null, "fast", 20, "all", "mean", NaN, false, 1.0, 1, false, "ddgi"]}',
                     "seed must be"),
        "seed 1e400": ("generate_from_mask", '{"data": ["A face.", null, "fast", 20, "all", "mean", 1e400, false, 1.0, 1, false, "ddgi"]}',
                       "seed must be"),
        "400-digit seed": ("generate_from_sketch", '{"data": ["A face.", null, "fast", 20, "all", "mean", 1' + "0" * 399
                           + ', false, 1.0, 1, false, "ddgi"]}', "seed must be"),
        "seed 1.5": ("generate_from_mask", generation(None, seed=1.5, randomize=False), "got 1.5"),
        "edit seed 1.5": ("edit_photo", [None, 0, "x", None, False, 1.0, "all", "modulate", 1.5, 0], "seed must be"),
        "truncation 'abc'": ("generate_from_mask", generation(None, truncation="abc"), "“Truncation ψ” cannot be read"),
        "mask as a string": ("generate_from_mask", generation("a mask"), "cannot read"),
        "too few arguments": ("generate_from_mask", ["A face."], "takes 12 input values"),
    }
    for what, (endpoint, body, words) in raw.items():
        message = error_message(url, endpoint, body)
        assert words.lower() in message.lower(), f"{what}: {message}"
        assert "Something went wrong" not in message, f"{what}: {message}"

    from gradio_client.exceptions import AppError

    files = {  # damaged files through the client, as a visitor's upload would come
        "damaged photo": lambda: client.predict(uploaded, 0, api_name="/invert_photo"),
        "damaged canvas": lambda: client.predict(*generation(canvas_of(uploaded)), api_name="/generate_from_mask"),
        "damaged mask upload": lambda: client.predict(uploaded, api_name="/upload_mask"),
    }
    for what, request in files.items():
        with pytest.raises(AppError) as caught:
            request()
        assert "truncated or damaged" in str(caught.value), f"{what}: {caught.value}"

    log = (space[1] / "app.log").read_text()
    assert "OverflowError" not in log and "Unexpected error" not in log


def test_a_whole_number_seed_still_generates_and_is_echoed(space, client):
    gallery, seed, *_ = client.predict(*generation(None, seed=4_294_967_295, randomize=False),
                                       api_name="/generate_from_mask")
    assert seed == 4_294_967_295 and "seed 4294967295" == gallery[0]["caption"]


# --------------------------------------------------------------------------------------------
# Round 2 (issue 19): through the HTTP API of the running Space
# --------------------------------------------------------------------------------------------

INTERNALS = re.compile(r"object at 0x|Error\b|Traceback|pydantic|/tmp/|/work/|\\|Original error|Errno")


def upload(url: str, name: str, content: bytes) -> dict:
    """POST /gradio_api/upload; the uploaded file as an input payload."""
    import httpx

    path = httpx.post(f"{url}gradio_api/upload", files={"files": (name, content, "image/png")}).json()[0]
    return {"path": path, "orig_name": name, "meta": {"_type": "gradio.FileData"}}


def solid_png(side: int, colour=(204, 0, 0)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def peak_rss_during(server: psutil.Process, action) -> float:
    """Peak RSS growth (MB) of the server while ``action`` runs: the kernel's high-water mark, reset first."""
    Path(f"/proc/{server.pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = server.memory_info().rss
    result = action()
    status = Path(f"/proc/{server.pid}/status").read_text()
    peak_kb = int(re.search(r"VmHWM:\s+(\d+) kB", status)[1])
    return (peak_kb * 1024 - before) / 2**20, result


def test_a_huge_canvas_and_many_layers_cost_little_memory(space):
    """6300 x 6300 solid PNG (under the 40 MP limit): +1.8 GB in the palette snapping and 11 s unqueued before;
    32 layers of it: 6.26 GB before."""
    url, _, server = space
    picture = upload(url, "solid.png", solid_png(6300))
    grown, (event, data) = peak_rss_during(
        server, lambda: call(url, "generate_from_mask", generation({**canvas_of(picture)}, seed=1, randomize=False)))
    assert event == "complete", data
    assert grown < 600, f"peak RSS grew by {grown:.0f} MB for a 6300-pixel canvas"
    layered = {**canvas_of(picture), "layers": [picture] * 32}
    grown, message = peak_rss_during(server, lambda: error_message(url, "generate_from_mask", generation(layered)))
    assert "at most 8 layers" in message and grown < 100, (message, grown)


def test_returned_names_go_through_the_image_checks(space):
    url = space[0]
    cases = [("mask-0123456789abcde0.png", huge_png(Path(space[1]) / "sixty.png", 7746, 7746), "too large"),
             ("mask-0123456789abcde1.png", None, "cannot read 'mask-0123456789abcde1.png'"),
             ("mask-0123456789abcde2.png", huge_png(Path(space[1]) / "bomb.png", 20_000, 20_000), "too large")]
    for name, picture, words in cases:
        upload(url, name, picture.read_bytes() if picture else b"<html><script>alert(1)</script></html>")
        named = {"background": name, "layers": [], "composite": name}
        message = error_message(url, "generate_from_mask", generation(named))
        assert words.lower() in message.lower() and not INTERNALS.search(message), message


def test_stateless_calls_do_not_evict_a_3d_face(space, client):
    """MAX_SESSIONS=5: six anonymous /load_template calls used to evict the 3D face of a visitor."""
    url = space[0]
    client.predict("A face.", "text only", None, None, 3, False, 0.7, 0, 0, False, api_name="/generate_3d")
    for _ in range(3 * MAX_SESSIONS):
        assert call(url, "load_template", ["glasses"])[0] == "complete"
    image, _, files = client.predict(10, 5, False, api_name="/render_view")  # refused if the face were gone
    assert image is not None and len(files) == 2


def test_disk_is_bounded_in_bytes_after_uploads_without_events(space):
    """1,000 uploads with no event left 2,359 files (cap 2,000) and GBs before."""
    url, workdir, _ = space
    noise = io.BytesIO()
    Image.effect_noise((180, 180), 90).convert("RGB").save(noise, format="PNG")  # ~100 KB that does not compress
    for index in range(1000):
        upload(url, f"upload-{index}.png", noise.getvalue() + index.to_bytes(4, "big"))
    cached = files_under(workdir / "gradio")
    kept_on_purpose_mb = 2  # canvases' initial values and example inputs (never deleted) are far below this
    total_mb = sum(path.lstat().st_size for path in cached) / 2**20
    assert total_mb <= CACHE_MAX_MB + kept_on_purpose_mb, f"{total_mb:.1f} MB in Gradio's cache"
    assert len(cached) <= CACHE_MAX_FILES + 40, f"{len(cached)} files in Gradio's cache"


def test_a_picture_sent_back_is_never_pruned_while_in_use(space, client):
    """The cache limit deleted a template still in use; the next 48 calls failed "does not exist"."""
    url = space[0]
    template = client.predict("glasses", api_name="/load_template")
    name = Path(template["background"]["path"]).name
    named = {"background": name, "layers": [], "composite": name}
    for seed in range(CACHE_MAX_FILES // 2):  # every run adds files: beyond the cap many times over
        event, data = call(url, "generate_from_mask", generation(named, seed=seed, randomize=False))
        assert event == "complete", f"call {seed}: {data}"


def test_no_error_names_a_path_a_class_or_an_address(space):
    url = space[0]
    long_data = "data:image/png;base64," + "A" * 5000
    raw = {  # the reproductions, and wrong types
        "too few arguments": ("generate_from_mask", ["A face."], "takes 12 input values"),
        "steps 'x'": ("generate_from_mask", ["A face.", None, "fast", "x", "all", "mean", 0, True, 1.0, 1, False,
                                             "ddgi"], "steps"),
        "file without meta": ("upload_mask", [{"path": "mask.png"}], "uploaded file"),
        "relative path with meta": ("upload_mask", [file_data("app.py")], "uploaded"),
        "long data path": ("upload_mask", [file_data(long_data)], "uploaded"),
        "prompt 12345": ("generate_from_mask", [12345, None, "fast", 20, "all", "mean", 0, True, 1.0, 1, False,
                                               "ddgi"], "must be text"),
        "checkbox 'yes'": ("generate_from_mask", ["A face.", None, "fast", 20, "all", "mean", 0, "yes", 1.0, 1,
                                                  False, "ddgi"], "true or false"),
        "edit prompt of 5,000 characters": ("edit_photo", [None, 0, "x" * 5000, None, False, 1.0, "all",
                                                           "modulate", 0, 0], "characters long"),
    }
    for what, (endpoint, body, words) in raw.items():
        message = error_message(url, endpoint, body)
        assert words.lower() in message.lower(), f"{what}: {message}"
        assert not INTERNALS.search(message), f"{what}: {message}"


def test_template_matching_is_queued(space):
    """POST /gradio_api/run/template_on_canvas ran outside the queue, as many at once as arrived."""
    import httpx

    url = space[0]
    config = httpx.get(f"{url}config").json()
    dependency = next(d for d in config["dependencies"] if d.get("api_name") == "template_on_canvas")
    assert dependency["queue"] is True, dependency  # was False: run at once, as many as arrived
    for api_name in ("template_on_canvas", "generate_from_mask"):  # the direct route would skip the queue
        response = httpx.post(f"{url}gradio_api/run/{api_name}", json={"data": [None]})
        assert response.status_code >= 400 and "queue" in response.text, response.text


# --------------------------------------------------------------------------------------------
# The pieces, without a server
# --------------------------------------------------------------------------------------------


def test_upload_paths_are_judged_by_their_real_path(tmp_path):
    from mm2latent.ui.security import checked_upload_path

    uploads, outside = tmp_path / "uploads", tmp_path / "outside"
    uploads.mkdir()
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"x")
    (uploads / "link.png").symlink_to(outside / "secret.png")
    (uploads / "ok.png").write_bytes(b"x")
    folders = [uploads.resolve()]
    assert checked_upload_path(uploads / "ok.png", folders) == str((uploads / "ok.png").resolve())
    assert checked_upload_path(uploads / "not-yet.png", folders).endswith("not-yet.png")
    import gradio as gr

    for path in (outside / "secret.png", outside / "missing.png", uploads / "link.png",
                 uploads / ".." / "outside" / "secret.png", "relative.png", "", None, 42):
        with pytest.raises(gr.Error) as caught:
            checked_upload_path(path, folders)
        assert caught.value.message.startswith(NOT_UPLOADED) or "names no file" in caught.value.message


def test_read_image_size_reads_the_header_only(tmp_path):
    from mm2latent.errors import ImageTooLargeError, InvalidImageError

    bomb = huge_png(tmp_path / "bomb.png", 13_000, 13_000)
    with pytest.raises(ImageTooLargeError, match=f"the limit is {MAX_IMAGE_PIXELS:,}|more than"):
        read_image_size(bomb)
    with pytest.raises(ImageTooLargeError, match="the image data is too large"):
        read_image_size(bomb.read_bytes())
    assert read_image_size(huge_png(tmp_path / "ok.png", 4000, 3000)) == (4000, 3000)  # 12 MP: never decoded
    with pytest.raises(InvalidImageError, match="cannot read"):
        read_image_size(b"not an image")


def test_output_store_keeps_only_its_newest_runs(tmp_path):
    from mm2latent.ui.outputs import OutputStore

    store = OutputStore(tmp_path / "runs", max_runs=3, max_age_s=float("inf"))
    folders = []
    for index in range(8):
        folder = store.new_folder()
        os.utime(folder, (1_000_000 + index, 1_000_000 + index))  # distinct ages without waiting
        folders.append(folder)
        assert len(list(store.root.iterdir())) == min(index + 1, 3)
    assert sorted(path.name for path in store.root.iterdir()) == sorted(f.name for f in folders[-3:])
    store.max_age_s = 3600.0  # every folder above is dated 1970
    store.prune()
    assert not list(store.root.iterdir())


def test_gradio_cache_limit_deletes_oldest_and_spares_kept_files(tmp_path):
    from types import SimpleNamespace

    from mm2latent.ui.outputs import GradioCacheLimit

    paths = []
    for index in range(10):  # written oldest first; equal ctimes fall back on the (same) name order
        folder = tmp_path / f"hash{index}"
        folder.mkdir()
        (folder / "image.png").write_bytes(b"x")
        paths.append(str(folder / "image.png"))
    uploads, outputs = set(paths[:4]), set(paths[4:])
    blocks = SimpleNamespace(blocks={1: SimpleNamespace(keep_in_cache={paths[0]})}, temp_file_sets=[uploads, outputs])
    limit = GradioCacheLimit(max_files=5, blocks=blocks)
    assert limit.prune() == 4  # 9 prunable files, 5 kept
    remaining = [path for path in paths if Path(path).exists()]
    assert remaining == [paths[0], *paths[5:]]  # kept on purpose, then the newest five
    assert len(uploads | outputs) == 6  # Gradio's record no longer lists the deleted files
    assert all(Path(path).parent.exists() == Path(path).exists() for path in paths)  # empty hash folders go
    assert limit.prune() == 0


class Session:
    """Stands for Gradio's per-visitor config object, which keys a session's drawings."""


def blob(drawing_id: str, picture: bytes, kind: str = "composite", index: str = "null"):
    """What Gradio's component_server route passes to accept_blobs: the form fields (text) and the file."""
    from gradio.data_classes import DataWithFiles

    return DataWithFiles(data={"type": kind, "index": index, "id": drawing_id}, files=[("blob", picture)])


def send_blob(canvas, session, *args) -> None:
    from gradio.context import LocalContext

    token = LocalContext.blocks_config.set(session)  # what component_server sets for the posting session
    try:
        canvas.accept_blobs(blob(*args))
    finally:
        LocalContext.blocks_config.reset(token)


def read_drawing(canvas, session, drawing_id: str):
    from mm2latent.ui.security import CURRENT_SESSION

    token = CURRENT_SESSION.set(session)  # what SpaceBlocks.preprocess_data sets for the event's session
    try:
        return canvas.preprocess(canvas.data_model(id=drawing_id))
    finally:
        CURRENT_SESSION.reset(token)


def png_bytes(size=(8, 8), colour=(204, 0, 0, 255)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_another_session_cannot_evict_a_drawing_and_a_missing_one_is_an_error():
    """The issue's reproduction: 70 one-pixel posts from another session used to evict the victim's drawing,
    and the victim's Generate then silently ran from text alone."""
    import gradio as gr
    from fastapi import HTTPException

    from mm2latent.ui import security

    canvas = security.DrawingCanvas(type="pil")
    victim, attacker = Session(), Session()
    send_blob(canvas, victim, "victim-drawing", png_bytes((8, 8)))
    for index in range(70):
        send_blob(canvas, attacker, f"spam-{index}", png_bytes((1, 1)))
    assert canvas.pending.count(attacker) == security.MAX_PENDING_DRAWINGS  # its own quota, its own oldest go
    with pytest.raises(gr.Error, match="did not reach the server"):
        read_drawing(canvas, attacker, "victim-drawing")  # another session cannot read it either
    assert read_drawing(canvas, victim, "victim-drawing")["composite"].size == (8, 8)
    with pytest.raises(gr.Error, match="did not reach the server"):  # used once: never an empty canvas after
        read_drawing(canvas, victim, "victim-drawing")
    for index in ("8", str(10**9), "-1", "x"):
        with pytest.raises(HTTPException) as caught:
            send_blob(canvas, attacker, "layered", png_bytes(), "layer", index)
        assert caught.value.status_code == 400 and "at most 8 layers" in caught.value.detail


def test_all_sessions_together_are_bounded_and_the_largest_pays(monkeypatch):
    from mm2latent.ui import security

    monkeypatch.setattr(security, "MAX_ALL_PENDING_DRAWING_BYTES", 20_000)
    canvas = security.DrawingCanvas(type="pil")
    victim, attacker = Session(), Session()
    small = png_bytes((8, 8))
    send_blob(canvas, victim, "victim-drawing", small)
    noise = io.BytesIO()
    Image.effect_noise((64, 64), 80).save(noise, format="PNG")  # ~4 KB that does not compress
    for index in range(security.MAX_PENDING_DRAWINGS):
        send_blob(canvas, attacker, f"big-{index}", noise.getvalue())
    assert canvas.pending.count(victim) == 1 and canvas.pending.count(attacker) < security.MAX_PENDING_DRAWINGS


def test_a_huge_canvas_is_read_on_a_small_copy(tmp_path):
    """6300 x 6300 (under the 40 MP limit): Gradio decoded it whole and the palette snapping took +1.8 GB."""
    from mm2latent.inputs.conditions import parse_mask
    from mm2latent.ui import security

    canvas = security.DrawingCanvas(type="pil", image_mode="RGBA")
    session = Session()
    big = io.BytesIO()
    Image.new("RGB", (6300, 6300), (204, 0, 0)).save(big, format="PNG")
    send_blob(canvas, session, "big", big.getvalue())
    value = read_drawing(canvas, session, "big")
    assert max(value["composite"].size) <= security.MAX_DRAWING_SIDE
    ids = parse_mask(Image.new("RGB", (6300, 6300), (204, 0, 0)), require_face=False)
    assert ids.shape == (6300, 6300) and set(np.unique(ids)) == {1}  # the answer at full size, all skin


def test_importing_the_components_writes_no_stub_file():
    """Gradio's component metaclass writes a `.pyi` beside any module defining a component; ours must not."""
    from mm2latent.ui import security

    assert not Path(security.__file__).with_suffix(".pyi").exists()
    assert security.UploadedImage(type="pil").get_block_name() == "image"
    assert security.DrawingCanvas(type="pil").get_block_name() == "imageeditor"


def test_output_stores_of_dead_processes_are_removed(tmp_path):
    import fcntl
    import subprocess
    import sys

    from mm2latent.ui.disk import claim_store_folder

    dead, alive, mine = (tmp_path / f"mm2latent-space-{name}" for name in ("dead", "alive", "mine"))
    for folder in (dead, alive, mine):
        folder.mkdir()
        (folder / "run.png").write_bytes(b"x")
    (dead / ".owner.lock").write_text("")  # its process is gone: nobody holds the lock
    (alive / ".owner.lock").write_text("")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1]); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()",
                               str(alive / ".owner.lock")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"  # waits on the other process's state
        claim = claim_store_folder(mine)
        assert not dead.exists() and alive.exists() and mine.exists()
        with pytest.raises(OSError), open(mine / ".owner.lock") as other:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # this process holds its own
        claim.close()
    finally:
        holder.stdin.close()
        holder.wait()
