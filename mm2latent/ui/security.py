"""What the Space refuses before any handler runs: server files, oversized images, unrounded numbers.

Gradio hands an input component whatever ``path`` an API caller writes into a file payload once its
own checks pass, and (gradio 6.31) a ``gr.Image`` payload without its ``meta`` field skips the check
that the file was uploaded at all, so ``{"path": "/any/file.jpg"}`` would be opened and sent back.
Gradio's image and editor components also decode a picture completely before anything can look at
its size. The input components here close both in the app, whatever Gradio does:

* every file that reaches a handler lies, once its real path is resolved, inside Gradio's upload
  folder or the Space's examples, or the request is refused with :data:`NOT_UPLOADED`, one message
  that does not depend on whether the file exists;
* an image's header is read (nothing decoded) and more than the library's
  :data:`~mm2latent.inputs.conditions.MAX_IMAGE_PIXELS` is refused before Gradio decodes it;
* a damaged file is refused in plain words instead of an unworded error.

They are Gradio "template" components (``is_template``): the browser draws them exactly as the
components they extend. :func:`limit_image_decoding` sets Pillow's own limit for any decode this
module does not see; :class:`NoSniffMiddleware` and :class:`SpaceBlocks` are the response-side pieces.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import itertools
import os
import threading
from abc import ABCMeta
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import anyio
import gradio as gr
from gradio.component_meta import ComponentMeta, updateable
from gradio.components.base import server
from gradio.data_classes import ListFiles
from gradio.utils import NamedString, get_upload_folder
from gradio_client.utils import is_valid_file
from PIL import Image
from starlette.datastructures import MutableHeaders

from ..errors import MM2LatentError
from ..inputs.conditions import MAX_IMAGE_PIXELS, read_image_size
from .examples import DEFAULT_FOLDER as EXAMPLES_FOLDER
from .handlers import user_error

NOT_UPLOADED = ("Only files uploaded to this Space can be used. Send the file itself (in the browser, or with "
                "gradio_client's handle_file), not a path on the server")
INLINE_DATA = ("Send the image as an uploaded file (in the browser, or with gradio_client's handle_file), not as "
               "inline data")
NO_FILE = "The image payload names no file. Send the image as an uploaded file"
# The editor's layers are off, so the browser sends one layer; a few more leave room, an index in the
# millions would make Gradio allocate a list that long.
MAX_EDITOR_LAYERS = 8
# Drawings the browser has sent and the next Generate has not used yet (normally one per click in flight).
MAX_PENDING_DRAWINGS = 64
MAX_PENDING_DRAWING_BYTES = 256 * 1024 * 1024


def limit_image_decoding(max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Make Pillow refuse, in every thread, to open an image of more than ``2 * max_pixels`` pixels.

    Pillow raises above twice its ``MAX_IMAGE_PIXELS`` and warns above it; the library turns that
    warning into :class:`~mm2latent.errors.ImageTooLargeError` itself, and the input components below
    check headers against ``max_pixels`` before Gradio decodes. This is the backstop for any other decode.
    """
    Image.MAX_IMAGE_PIXELS = max_pixels


# --------------------------------------------------------------------------------------------
# Where files may come from
# --------------------------------------------------------------------------------------------


def allowed_folders(extra: Iterable[str | os.PathLike] = (EXAMPLES_FOLDER,)) -> list[Path]:
    """Gradio's upload folder (where uploads and Gradio's cached copies live) and ``extra``, real paths."""
    return [Path(os.path.realpath(folder)) for folder in (get_upload_folder(), *extra)]


def checked_upload_path(path: Any, folders: Iterable[Path] | None = None) -> str:
    """``path`` resolved (symlinks, ``..``) when it lies inside ``folders``; otherwise :data:`NOT_UPLOADED`.

    Only the path is looked at, never the file, so the answer is the same for files that exist and
    files that do not.
    """
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise user_error(NO_FILE)
    real = Path(os.path.realpath(os.fspath(path)))
    if not any(real.is_relative_to(folder) for folder in (folders or allowed_folders())):
        raise user_error(NOT_UPLOADED)
    return str(real)


def _display_name(file: Any) -> str:
    """The file as the visitor named it (never a server path), quoted, for messages."""
    name = getattr(file, "orig_name", None) or Path(str(getattr(file, "path", None) or "image")).name
    return repr(Path(name).name)


def check_image_header(image: str | bytes, what: str) -> None:
    """Refuse an image whose header is unreadable or claims more than the pixel limit; decodes nothing.

    ``what`` names the image in messages, e.g. ``"'photo.jpg'"`` or ``"the drawing"``.
    """
    try:
        read_image_size(image)
    except MM2LatentError as error:
        message = str(error).replace("the image data", what) if isinstance(image, bytes) else str(error)
        raise user_error(message) from None


def decoding_plainly(decode: Callable, payload: Any, what: str) -> Any:
    """Run Gradio's ``decode(payload)``, turning a failure on a damaged file into a plain ``gr.Error``."""
    try:
        return decode(payload)
    except gr.Error:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise user_error(f"Cannot decode {what}: the file is truncated or damaged ({type(error).__name__})") \
            from None


# --------------------------------------------------------------------------------------------
# Input components
# --------------------------------------------------------------------------------------------


class _NoStubFile(ComponentMeta):
    """Gradio's component metaclass without its side effect of writing a ``.pyi`` stub beside every
    module that defines a component (into the installed package, at import time)."""

    def __new__(mcs, name, bases, attrs):
        if "__init__" in attrs:
            attrs["__init__"] = updateable(attrs["__init__"])
        return ABCMeta.__new__(mcs, name, bases, attrs)


class UploadedImage(gr.Image, metaclass=_NoStubFile):
    """``gr.Image`` that opens only uploaded files, and only when their header is within the pixel limit."""

    is_template = True

    def preprocess(self, payload):
        if payload is None:
            return None
        if payload.url and payload.url.startswith("data:"):
            raise user_error(INLINE_DATA)
        payload.path = checked_upload_path(payload.path)
        what = _display_name(payload)
        check_image_header(payload.path, what)
        return decoding_plainly(super().preprocess, payload, what)


class UploadedFile(gr.File, metaclass=_NoStubFile):
    """``gr.File`` that passes on only uploaded files, as paths (``type="filepath"``): the handler reads them.

    Gradio's own ``File.preprocess`` also leaves an empty ``NamedTemporaryFile(delete=False)`` in its
    cache for every file it passes on; this one creates nothing.
    """

    is_template = True

    def preprocess(self, payload):
        if payload is None:
            return None
        files = payload.root if isinstance(payload, ListFiles) else [payload]
        paths = [checked_upload_path(file.path) for file in files]
        for path in paths:
            if self.file_types and not is_valid_file(path, self.file_types):
                raise user_error(f"Invalid file type: upload one of {', '.join(self.file_types)}")
        named = [NamedString(path) for path in paths]
        return named[0] if self.file_count == "single" else named


class DrawingCanvas(gr.ImageEditor, metaclass=_NoStubFile):
    """``gr.ImageEditor`` whose pictures are checked (upload folder, header) before Gradio decodes them.

    The browser sends a drawing in two steps: the pictures as blobs (``accept_blobs``, kept in memory
    under an id) and then the event with that id. Blobs the event never collects are dropped oldest
    first beyond :data:`MAX_PENDING_DRAWINGS` drawings or :data:`MAX_PENDING_DRAWING_BYTES` bytes.
    """

    is_template = True

    def preprocess(self, payload):
        if payload is None:
            return None
        if payload.id is not None:
            drawing = self.blob_storage.get(payload.id)
            pictures = [] if drawing is None else [drawing.background, *drawing.layers, drawing.composite]
            for picture in pictures:
                if picture is not None:
                    check_image_header(bytes(picture), "the drawing")
        else:
            for file in (payload.background, *payload.layers, payload.composite):
                if file is not None:
                    file.path = checked_upload_path(file.path)
                    check_image_header(file.path, _display_name(file))
        return decoding_plainly(super().preprocess, payload, "the drawing")

    @server
    def accept_blobs(self, data):
        index = data.data.get("index")
        if data.data.get("type") == "layer" and index not in (None, "null"):
            if not str(index).isdigit() or int(index) >= MAX_EDITOR_LAYERS:
                raise user_error(f"A drawing has at most {MAX_EDITOR_LAYERS} layers")
        super().accept_blobs(data)
        storage = self.blob_storage  # a dict: its order is insertion order, the newest drawing last
        storage[data.data["id"]] = storage.pop(data.data["id"])
        while len(storage) > MAX_PENDING_DRAWINGS or (
                len(storage) > 1 and _stored_bytes(storage) > MAX_PENDING_DRAWING_BYTES):
            del storage[next(iter(storage))]


def _stored_bytes(storage: dict) -> int:
    return sum(len(picture) for drawing in storage.values()
               for picture in (drawing.background, *drawing.layers, drawing.composite) if picture is not None)


class WholeNumber(gr.Number, metaclass=_NoStubFile):
    """``gr.Number`` whose value reaches the handler exactly as sent.

    Gradio's own preprocessing would round (``precision=0`` turns a seed of 1.5 into 2) and fail
    without words on "abc", NaN or 1e400; the handler checks the raw value and says what is wrong.
    """

    is_template = True

    def preprocess(self, payload):
        return payload


# --------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------


class NoSniffMiddleware:
    """ASGI middleware: ``X-Content-Type-Options: nosniff`` on every HTTP response.

    Gradio serves ``/file=`` with the type the file name claims; without this header a browser may
    sniff the content instead, e.g. render an HTML page uploaded under a ``.png`` name.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Content-Type-Options"] = "nosniff"
            await send(message)

        return await self.app(scope, receive, send_with_header)


class SpaceBlocks(gr.Blocks):
    """``gr.Blocks`` with the Space's limits on what it shows and keeps.

    * The API description shows no server path: a component's initial value is the API's default
      for that parameter, and for the drawing canvases that is a file in Gradio's temporary folder,
      so such parameters are listed as required instead.
    * After every event, ``cache_limit`` (a :class:`~mm2latent.ui.outputs.GradioCacheLimit`) trims
      Gradio's cache, so its file count stays bounded however fast events come.
    * Every ``trim_heap_every`` events, freed heap memory is handed back to the system (glibc's
      ``malloc_trim``, in the background). Images are decoded and encoded in Gradio's worker
      threads, each with its own malloc arena; without this their freed pages stay in the process
      and RSS creeps up by ~0.2 MB per generation although nothing is kept (benchmarks/soak.py).

    Args:
        cache_limit: what trims Gradio's cache (None: nothing beyond Gradio's ``delete_cache``).
        trim_heap_every: events between two heap trims (0: never).
        *args, **kwargs: as for ``gr.Blocks``.
    """

    def __init__(self, *args, cache_limit=None, trim_heap_every: int = 20, **kwargs):
        super().__init__(*args, **kwargs)
        self.cache_limit = cache_limit.attach(self) if cache_limit is not None else None
        self.trim_heap_every = trim_heap_every
        self._events = itertools.count(1)
        self._trimming = threading.Lock()

    async def process_api(self, *args, **kwargs):
        try:
            return await super().process_api(*args, **kwargs)
        finally:
            if self.cache_limit is not None:
                await anyio.to_thread.run_sync(self.cache_limit.prune)
            if self.trim_heap_every and next(self._events) % self.trim_heap_every == 0 and _MALLOC_TRIM:
                # Not awaited: the response need not wait for it.
                asyncio.get_running_loop().run_in_executor(None, self._trim_heap)

    def _trim_heap(self) -> None:
        if self._trimming.acquire(blocking=False):  # one trim at a time; a skipped one is no loss
            try:
                _MALLOC_TRIM(0)
            finally:
                self._trimming.release()

    def get_api_info(self, all_endpoints: bool = False, page: str | None = None):
        info = super().get_api_info(all_endpoints=all_endpoints, page=page)
        for endpoints in (info["named_endpoints"], info["unnamed_endpoints"]):
            for endpoint in endpoints.values():
                for parameter in endpoint["parameters"]:
                    if _names_a_file(parameter.get("parameter_default")):
                        parameter["parameter_has_default"] = False
                        parameter["parameter_default"] = None
        return info


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where there is none (macOS, musl)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _find_malloc_trim()


def _names_a_file(value: Any) -> bool:
    if isinstance(value, dict):
        return "path" in value or any(_names_a_file(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_names_a_file(item) for item in value)
    return False
