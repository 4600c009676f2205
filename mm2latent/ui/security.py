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
import contextvars
import ctypes
import ctypes.util
import functools
import itertools
import logging
import math
import os
import re
import threading
import weakref
from abc import ABCMeta
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import anyio
import gradio as gr
import pydantic
from fastapi import HTTPException
from gradio import image_utils
from gradio.component_meta import ComponentMeta, updateable
from gradio.components.base import server
from gradio.components.image_editor import EditorDataBlobs
from gradio.context import LocalContext
from gradio.data_classes import FileData, ListFiles
from gradio.exceptions import ComponentProcessingError
from gradio.utils import NamedString, get_upload_folder
from gradio_client.utils import is_valid_file
from PIL import Image
from starlette.datastructures import MutableHeaders

from ..errors import MM2LatentError
from ..inputs.images import MAX_IMAGE_PIXELS, open_image_file, read_image_size
from .examples import DEFAULT_FOLDER as EXAMPLES_FOLDER
from .handlers import plain, user_error

NOT_UPLOADED = ("Only files uploaded to this Space can be used. Send the file itself (in the browser, or with "
                "gradio_client's handle_file), not a path on the server")
INLINE_DATA = ("Send the image as an uploaded file (in the browser, or with gradio_client's handle_file), not as "
               "inline data")
NO_FILE = "The image payload names no file. Send the image as an uploaded file"
MISSING_DRAWING = ("Your drawing did not reach the server (or the page sent it twice): nothing was generated. "
                   "Click the button again; if it keeps happening, reload the page")
# The editor's layers are off, so the browser sends one layer; a few more leave room, an index in the
# millions would make Gradio allocate a list that long.
MAX_EDITOR_LAYERS = 8
# Drawings the browser has sent and an event has not used yet, per visitor session (normally one per click in
# flight), and over all sessions: beyond the latter, the session holding the most bytes gives up its oldest.
MAX_PENDING_DRAWINGS = 8
MAX_PENDING_DRAWING_BYTES = 64 * 1024 * 1024
MAX_ALL_PENDING_DRAWING_BYTES = 256 * 1024 * 1024
# Editor pictures larger than this (a side) are shrunk as soon as they are decoded, one at a time: the canvas is
# 512 pixels, the model reads the mask at its own size, and a 6300-pixel canvas would cost GBs downstream.
MAX_DRAWING_SIDE = 2048
_DRAWING_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
log = logging.getLogger("mm2latent.space")
# The visitor session whose event is being prepared (set by SpaceBlocks.preprocess_data).
CURRENT_SESSION = contextvars.ContextVar("mm2latent_session", default=None)


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
    """The file as the visitor named it (never a server path), for messages."""
    name = getattr(file, "orig_name", None) or Path(str(getattr(file, "path", None) or "image")).name
    return Path(name).name


def check_image_header(image: str | bytes, name: str) -> None:
    """Refuse an image whose header is unreadable or claims more than the pixel limit; decodes nothing.

    ``name`` names a file in messages (its base name, e.g. ``photo.jpg``); encoded bytes are "the drawing".
    """
    try:
        read_image_size(image, name=None if isinstance(image, bytes) else name)
    except MM2LatentError as error:
        raise user_error(str(error).replace("the image data", "the drawing")) from None


def open_picture(image: str | bytes, name: str) -> Image.Image:
    """:func:`~mm2latent.inputs.images.open_image_file` (header checked first) with its errors as ``gr.Error``."""
    try:
        return open_image_file(image, name=None if isinstance(image, bytes) else name)
    except MM2LatentError as error:
        raise user_error(str(error).replace("the image data", "the drawing")) from None


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


class PendingDrawings:
    """Drawings the browser has sent (``accept_blobs``) and no event has collected yet, kept per visitor session.

    A visitor's drawing is only ever dropped for that visitor's own newer drawings (at most
    :data:`MAX_PENDING_DRAWINGS` drawings or :data:`MAX_PENDING_DRAWING_BYTES` bytes each) or, when all sessions
    together hold more than :data:`MAX_ALL_PENDING_DRAWING_BYTES`, by the session holding the most bytes. Sessions
    are Gradio's per-visitor objects, held weakly: a session Gradio forgets takes its drawings with it.
    """

    def __init__(self):
        self._sessions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def add(self, session: Any, drawing_id: str, kind: str, index: int | None, picture: bytes) -> None:
        with self._lock:
            drawings = self._sessions.setdefault(session, OrderedDict())
            drawing = drawings.pop(drawing_id, None) or EditorDataBlobs(background=None, layers=[], composite=None)
            if kind == "layer" and index is not None:
                drawing.layers.extend([None] * (index + 1 - len(drawing.layers)))
                drawing.layers[index] = picture
            elif kind in ("background", "composite"):
                setattr(drawing, kind, picture)
            drawings[drawing_id] = drawing  # the newest last
            while len(drawings) > MAX_PENDING_DRAWINGS or (
                    len(drawings) > 1 and _stored_bytes(drawings) > MAX_PENDING_DRAWING_BYTES):
                drawings.popitem(last=False)
            while sum(map(_stored_bytes, self._sessions.values())) > MAX_ALL_PENDING_DRAWING_BYTES:
                largest = max(self._sessions.values(), key=_stored_bytes)
                largest.popitem(last=False)

    def take(self, session: Any, drawing_id: str) -> EditorDataBlobs | None:
        """The drawing, removed from the store; None when the session has no drawing of that id."""
        with self._lock:
            drawings = self._sessions.get(session)
            return None if drawings is None else drawings.pop(drawing_id, None)

    def count(self, session: Any) -> int:
        with self._lock:
            return len(self._sessions.get(session, ()))


class _NoSession:
    """The session of calls made outside an event (tests, scripts): one shared bucket."""


_NO_SESSION = _NoSession()


def _current_session(from_component_server: bool = False) -> Any:
    """Gradio's per-visitor ``BlocksConfig`` copy: the same object for a session's blob posts and events."""
    if from_component_server:
        session = LocalContext.blocks_config.get(None)
    else:
        session = CURRENT_SESSION.get()
    return _NO_SESSION if session is None else session


def _stored_bytes(drawings: dict) -> int:
    return sum(len(picture) for drawing in drawings.values()
               for picture in (drawing.background, *drawing.layers, drawing.composite) if picture is not None)


class DrawingCanvas(gr.ImageEditor, metaclass=_NoStubFile):
    """``gr.ImageEditor`` whose pictures are checked (count, upload folder, header) before any is decoded.

    The browser sends a drawing in two steps: the pictures as blobs (``accept_blobs``, kept in memory under
    an id, per visitor session: :class:`PendingDrawings`) and then the event with that id. An id the store
    does not hold is refused in words (:data:`MISSING_DRAWING`), never read as an empty canvas. Every picture
    is opened by the library's one image-opening function and shrunk beyond :data:`MAX_DRAWING_SIDE`.
    """

    is_template = True

    @property
    def pending(self) -> PendingDrawings:
        return self.__dict__.setdefault("_pending_drawings", PendingDrawings())

    def preprocess(self, payload):
        if payload is None:
            return None
        if payload.id is not None:
            drawing = self.pending.take(_current_session(), payload.id)
            if drawing is None:
                raise user_error(MISSING_DRAWING)
            background, layers, composite = drawing.background, drawing.layers, drawing.composite
        else:
            background, layers, composite = payload.background, payload.layers, payload.composite
        if len(layers) > MAX_EDITOR_LAYERS:
            raise user_error(f"A drawing has at most {MAX_EDITOR_LAYERS} layers; this one has {len(layers)}")
        pictures = []
        for part in (background, *layers, composite):  # every header is checked before anything is decoded
            if part is None:
                pictures.append(None)
            elif isinstance(part, FileData):
                path = checked_upload_path(part.path)
                check_image_header(path, _display_name(part))
                pictures.append((path, _display_name(part)))
            else:
                check_image_header(bytes(part), "the drawing")
                pictures.append((bytes(part), "the drawing"))
        background, *layers, composite = pictures
        return {"background": self.decode_picture(background, flatten_on_white=True),
                "layers": [picture for picture in map(self.decode_picture, layers) if picture is not None],
                "composite": self.decode_picture(composite, flatten_on_white=True)}

    def decode_picture(self, picture: tuple[str | bytes, str] | None, flatten_on_white: bool = False) -> Any:
        """One picture opened, shrunk when huge and converted as Gradio's editor would (``type``, ``image_mode``)."""
        if picture is None:
            return None
        image = open_picture(*picture)
        if max(image.size) > MAX_DRAWING_SIDE:  # BOX averages (palette images: nearest), so thin strokes stay
            factor = math.ceil(max(image.size) / MAX_DRAWING_SIDE)
            image = image.resize((max(1, image.width // factor), max(1, image.height // factor)),
                                 Image.Resampling.BOX)
        if (flatten_on_white and self.image_mode not in ("RGBA", "LA", "PA")
                and ("A" in image.getbands() or "transparency" in image.info)):
            image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
        return image_utils.format_image(image.convert(self.image_mode), self.type, self.GRADIO_CACHE,
                                        format=self.format, name="image")

    @server
    def accept_blobs(self, data):
        fields = data.data if isinstance(data.data, dict) else {}
        kind, index, drawing_id = fields.get("type"), fields.get("index"), fields.get("id")
        if kind not in ("background", "composite", "layer") or not isinstance(drawing_id, str) \
                or not _DRAWING_ID.fullmatch(drawing_id) or len(data.files) != 1:
            raise HTTPException(status_code=400, detail="Not a picture of a drawing")
        if index in (None, "null", ""):
            index = None
        elif not str(index).isdigit() or int(index) >= MAX_EDITOR_LAYERS:
            raise HTTPException(status_code=400, detail=f"A drawing has at most {MAX_EDITOR_LAYERS} layers")
        else:
            index = int(index)
        self.pending.add(_current_session(from_component_server=True), drawing_id, kind, index,
                         bytes(data.files[0][1]))


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
    * After every event (and on uploads and a timer, from :meth:`launch`), ``cache_limit`` (a
      :class:`~mm2latent.ui.disk.GradioCacheLimit`) trims Gradio's cache in files and bytes.
    * Only sessions holding state count against Gradio's session cap (:func:`keep_sessions_with_state`);
      Gradio's own refusals are reworded (:func:`client_error`) and raw types checked (:func:`check_raw_types`).
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

    def launch(self, *args, **kwargs):
        if self.cache_limit is not None:  # what a killed earlier run left, then on a timer (files expire unasked)
            self.cache_limit.remove_orphans()
            self.cache_limit.start()
        return super().launch(*args, **kwargs)

    # Gradio sets this attribute when it starts serving; the session cap then counts only sessions with state.
    @property
    def state_holder(self):
        return self.__dict__.get("_state_holder")

    @state_holder.setter
    def state_holder(self, holder) -> None:
        holder.update = functools.partial(keep_sessions_with_state, holder)
        self.__dict__["_state_holder"] = holder

    async def preprocess_data(self, block_fn, inputs, state, explicit_call: bool = False):
        CURRENT_SESSION.set(None if state is None else state.blocks_config)  # whose drawings the canvases may read
        if not explicit_call:
            check_raw_types(block_fn.inputs, inputs)
        return await super().preprocess_data(block_fn, inputs, state, explicit_call)

    @staticmethod
    def _format_processing_error(block_fn, index, block, value, is_input, original_error) -> str:
        """Gradio's message for a value a component cannot read, without its class names and the raw value."""
        log.info("Input %d of /%s refused: %s: %s", index, block_fn.api_name, type(original_error).__name__,
                 original_error)
        return plain(f"{_label(block, index)} cannot be read: it is not the kind of value this input takes "
                     "(see the endpoint's parameters under “Use via API”)")

    async def process_api(self, *args, **kwargs):
        try:
            return await super().process_api(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as error:  # Gradio's own checks: never show their internal text
            raise client_error(error) from None
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


# --------------------------------------------------------------------------------------------
# What a client sent that Gradio itself refuses, and sessions
# --------------------------------------------------------------------------------------------

_ENOUGH_INPUTS = re.compile(r"needed: (\d+), got: (\d+)")


def _label(block: Any, index: int) -> str:
    label = getattr(block, "label", None)
    return f"“{label}”" if isinstance(label, str) and label else f"Input {index + 1}"


def check_raw_types(blocks: list, values: list) -> None:
    """Refuse, before Gradio converts them, texts that are not text and checkboxes that are not true/false.

    Gradio's ``Textbox`` turns a prompt sent as ``12345`` into ``"12345"`` and ``Checkbox`` passes ``"yes"`` on;
    a wrong type is the caller's mistake and gets a message.
    """
    for index, (block, value) in enumerate(zip(blocks, values)):
        if isinstance(block, gr.Checkbox) and not isinstance(value, bool):
            raise user_error(f"{_label(block, index)} must be true or false, got {type(value).__name__}")
        if isinstance(block, gr.Textbox) and value is not None and not isinstance(value, str):
            raise user_error(f"{_label(block, index)} must be text, got {type(value).__name__}")


def client_error(error: Exception) -> gr.Error:
    """A plain message for a request Gradio could not process; never a server path, class name or address."""
    text = str(error)
    if isinstance(error, ComponentProcessingError):  # its text is ours: SpaceBlocks._format_processing_error
        return user_error(text)
    enough = _ENOUGH_INPUTS.search(text)
    if enough:
        return user_error(f"This endpoint takes {enough[1]} input values; the request sent {enough[2]}. Its "
                          "parameters are listed under “Use via API”")
    if isinstance(error, pydantic.ValidationError):
        fields = sorted({".".join(str(part) for part in issue["loc"]) for issue in error.errors()} - {""})
        where = f" (in {', '.join(fields[:4])})" if fields else ""
        if "meta" in text:
            return user_error(f"Send files as uploaded files (gradio_client's handle_file), with their "
                              f"'meta' field{where}")
        return user_error(f"The request holds a value this endpoint cannot read{where}: send files as uploaded "
                          "files (gradio_client's handle_file) and values of the parameters' types")
    if "Cannot move" in text or "upload folder" in text or isinstance(error, OSError):
        return user_error(NOT_UPLOADED)
    log.warning("Request refused by Gradio: %s: %s", type(error).__name__, text[:500])
    return user_error("This request could not be processed: check its values against the endpoint's parameters "
                      "(“Use via API”)")


def _holds_state(session: Any) -> bool:
    """Whether a Gradio session keeps something a visitor would miss: a ``gr.State`` away from its initial value."""
    for key, value in list(session.state_data.items()):
        default = getattr(session.blocks_config.blocks.get(key), "value", None)
        if value is None or value is default:
            continue
        try:
            if bool(value == default):
                continue
        except Exception:  # arrays and other values without a plain truth value: a value of its own
            pass
        return True
    return False


def keep_sessions_with_state(holder: Any, session_id: str) -> None:
    """``StateHolder.update`` that counts only sessions holding state against its capacity (least recently used
    dropped first); sessions without state (any stateless API call makes one) are dropped first, beyond as many."""
    with holder.lock:
        sessions = holder.session_data
        if session_id in sessions:
            sessions.move_to_end(session_id)
        if len(sessions) <= holder.capacity:
            return
        with_state = [key for key, session in sessions.items() if _holds_state(session)]
        stateless = [key for key in sessions if key not in set(with_state)]
        for group in (with_state, stateless):
            for key in group[: max(0, len(group) - holder.capacity)]:
                if key != session_id:
                    sessions.pop(key, None)
                    holder.time_last_used.pop(key, None)
