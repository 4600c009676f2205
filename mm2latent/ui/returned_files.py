"""Editor pictures the Space hands out, which an API caller may pass straight back to another endpoint.

gradio_client downloads every file an endpoint returns and gives the caller local paths. Passed back as an
input (``/invert_photo``'s mask into ``/edit_photo``, ``/upload_mask``'s canvas into
``/generate_from_mask``), those are plain strings, which Gradio refuses ("The 'meta' field must be
explicitly provided"): a server must never open a path a client names. So a :class:`ReturnableCanvas`
writes each picture it returns under a unique random name (``mask-<16 hex digits>.png``); Gradio copies it
into its cache under the same name (and serves it from there). A string sent back is reduced to its file
name, which must have that form, and looked up in Gradio's cache only. The name is the capability, as the
file's download URL already is; nothing else on the server can be named, and the copies live exactly as
long as Gradio's cache keeps them (``MM2LATENT_CACHE_MAX_FILES``, ``MM2LATENT_CACHE_MAX_AGE``).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.data_classes import FileData, GradioModel
from PIL import Image

from .handlers import user_error
from .outputs import OutputStore
from .security import MAX_EDITOR_LAYERS, DrawingCanvas

RETURNED_NAME = re.compile(r"[a-z]{1,16}-[0-9a-f]{16}\.png")


def returned_name(what: str) -> str:
    """A new unique file name for a returned picture: ``<what>-<16 hex digits>.png``."""
    return f"{what}-{secrets.token_hex(8)}.png"


def file_name(path: str) -> str:
    """The last part of a path written on any system (``/`` or ``\\`` separators)."""
    return Path(str(path).replace("\\", "/")).name


def find_returned(cache: str | Path, path: str) -> Path | None:
    """The copy in Gradio's ``cache`` of the returned picture whose name ends ``path``, or None.

    A picture found is marked as just used (its times are set to now), so the cache limit, which deletes the
    oldest files first, keeps pictures a visitor keeps sending back.
    """
    name = file_name(path)
    if not RETURNED_NAME.fullmatch(name):
        return None
    copies = [(copy.stat().st_mtime, str(copy), copy) for copy in Path(cache).glob(f"*/{name}") if copy.is_file()]
    found = max(copies)[2] if copies else None  # the newest, should a caller upload a file of that name too
    if found is not None:
        with contextlib.suppress(OSError):
            os.utime(found)
    return found


class EditorDataOrNames(GradioModel):
    """A mask editor value as the browser sends it (uploaded files), or naming returned pictures."""

    background: FileData | str | None = None
    layers: list[FileData | str] = []
    composite: FileData | str | None = None
    id: str | None = None


class ReturnableCanvas(DrawingCanvas):
    """A :class:`~mm2latent.ui.security.DrawingCanvas` (``type="pil"``) whose returned pictures can be sent back.

    Args:
        what: names the files (``mask``, ``sketch``), so a caller sees what they hold.
        store: where returned pictures are written before Gradio copies them (default: a new store).
        *args, **kwargs: as ``gr.ImageEditor``.
    """

    is_template = True
    data_model = EditorDataOrNames

    def __init__(self, *args, what: str = "canvas", store: OutputStore | None = None, **kwargs):
        if not re.fullmatch(r"[a-z]{1,16}", what):
            raise ValueError(f"what must be 1 to 16 lowercase letters, got {what!r}")
        self.what = what
        self.store = store or OutputStore()
        super().__init__(*args, **kwargs)

    # Gradio describes a component to the browser by its direct parent's name and by the parameters of its
    # own __init__: both must be the image editor's.
    def get_block_name(self) -> str:
        return "imageeditor"

    def get_block_class(self) -> str:
        return "imageeditor"

    def get_config(self, cls=None) -> dict[str, Any]:
        return super().get_config(cls or gr.ImageEditor)

    def preprocess(self, payload):
        if payload is not None and any(isinstance(part, str) for part in
                                       (payload.background, payload.composite, *payload.layers)):
            if len(payload.layers) > MAX_EDITOR_LAYERS:
                raise user_error(f"A drawing has at most {MAX_EDITOR_LAYERS} layers; this one has "
                                 f"{len(payload.layers)}")
            return {"background": self._returned_picture(payload.background),
                    "layers": [self._returned_picture(layer) for layer in payload.layers],
                    "composite": self._returned_picture(payload.composite)}
        return super().preprocess(payload)

    def postprocess(self, value):
        if isinstance(value, dict) and any(isinstance(value.get(key), Image.Image)
                                           for key in ("background", "composite")):
            folder = self.store.new_folder()
            background, composite = value.get("background"), value.get("composite")
            saved = self._saved(background, folder)
            value = {**value, "background": saved,
                     "composite": saved if composite is background else self._saved(composite, folder)}
        return super().postprocess(value)

    def _saved(self, part: Any, folder: Path) -> Any:
        if not isinstance(part, Image.Image):
            return part
        path = folder / returned_name(self.what)
        part.save(path)
        return str(path)

    def _returned_picture(self, part: Any) -> Image.Image | None:
        if part is None:
            return None
        if not isinstance(part, str):
            raise user_error("Send every picture of an editor value the same way: all as files "
                             "(gradio_client's handle_file) or all as the pictures this Space returned")
        path = find_returned(self.GRADIO_CACHE, part)
        if path is None:
            raise user_error(
                f"'{file_name(part)}' is not a picture this Space returned recently, and the server cannot read "
                "files on your machine: send it with gradio_client's handle_file(path)")
        return self.decode_picture((str(path), path.name))
