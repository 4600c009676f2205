"""Pictures the Space hands out in an editor, which an API caller may pass straight back to another endpoint.

gradio_client downloads every file an endpoint returns and gives the caller local paths. Passed back as an
input (``/invert_photo``'s mask into ``/edit_photo``, ``/upload_mask``'s canvas into
``/generate_from_mask``), those are plain strings, which Gradio refuses ("The 'meta' field must be
explicitly provided"): a server must never open a path a client names. So each picture a
:class:`ReturnableCanvas` returns is written under a unique random name (``<what>-<16 hex digits>.png``) and
remembered; a string sent back is reduced to its file name and looked up among those names only. The
name is the capability, as the file's download URL already is; nothing else on the server can be named.
"""

from __future__ import annotations

import collections
import secrets
import tempfile
import threading
from pathlib import Path
from typing import Any

from gradio.data_classes import FileData, GradioModel
from PIL import Image

from .handlers import user_error
from .security import DrawingCanvas

#: How many returned pictures are remembered (the oldest are deleted first); a 512² mask PNG is about 10 kB.
MAX_RETURNED_FILES = 1000


class ReturnedFiles:
    """Pictures written under unique names, found again by name; at most ``max_files`` kept.

    Args:
        root: the folder they are written to (default: a new temporary folder).
        max_files: how many are kept; the oldest file is deleted when one more is written.
    """

    def __init__(self, root: str | Path | None = None, max_files: int = MAX_RETURNED_FILES):
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="mm2latent-returned-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_files = max_files
        self._paths: collections.OrderedDict[str, Path] = collections.OrderedDict()
        self._lock = threading.Lock()

    def save(self, image: Image.Image, what: str = "canvas") -> Path:
        """Write ``image`` as ``<what>-<random>.png`` and remember it; returns its path."""
        name = f"{what}-{secrets.token_hex(8)}.png"
        path = self.root / name
        image.save(path)
        with self._lock:
            self._paths[name] = path
            while len(self._paths) > self.max_files:
                _, oldest = self._paths.popitem(last=False)
                oldest.unlink(missing_ok=True)
        return path

    def find(self, path_or_name: str) -> Path | None:
        """The file this store wrote under the name ending ``path_or_name`` (any folder), or None."""
        name = Path(str(path_or_name).replace("\\", "/")).name
        with self._lock:
            path = self._paths.get(name)
        return path if path is not None and path.is_file() else None


#: One store for every canvas: one endpoint's output is another endpoint's input.
RETURNED_FILES = ReturnedFiles()


class EditorDataOrNames(GradioModel):
    """A mask editor value as the browser sends it (uploaded files), or naming pictures by file name."""

    background: FileData | str | None = None
    layers: list[FileData | str] = []
    composite: FileData | str | None = None
    id: str | None = None


class ReturnableCanvas(DrawingCanvas):
    """A :class:`~mm2latent.ui.security.DrawingCanvas` whose returned pictures can be sent back by name.

    Only for ``type="pil"`` editors. ``what`` names the files (``mask``, ``sketch``) so a caller sees what
    they hold.
    """

    is_template = True
    data_model = EditorDataOrNames

    def __init__(self, *args, what: str = "canvas", **kwargs):
        self.what = what
        super().__init__(*args, **kwargs)

    def preprocess(self, payload):
        if payload is not None and any(isinstance(part, str) for part in
                                       (payload.background, payload.composite, *payload.layers)):
            return {"background": self._returned_picture(payload.background),
                    "layers": [self._returned_picture(layer) for layer in payload.layers],
                    "composite": self._returned_picture(payload.composite)}
        return super().preprocess(payload)

    def postprocess(self, value):
        if isinstance(value, dict):
            background, composite = value.get("background"), value.get("composite")
            saved = self._saved(background)
            value = {**value, "background": saved,
                     "composite": saved if composite is background else self._saved(composite)}
        return super().postprocess(value)

    def _saved(self, part: Any) -> Any:
        return str(RETURNED_FILES.save(part, self.what)) if isinstance(part, Image.Image) else part

    def _returned_picture(self, part: Any) -> Image.Image | None:
        if part is None:
            return None
        if not isinstance(part, str):
            raise user_error("Send every picture of an editor value the same way: all as files "
                             "(gradio_client.handle_file) or all as names of pictures this Space returned")
        path = RETURNED_FILES.find(part)
        if path is None:
            raise user_error(
                f"'{Path(part.replace(chr(92), '/')).name}' is not a picture this Space returned recently, and the "
                "server cannot read files on your machine: send it with gradio_client's handle_file(path)")
        with Image.open(path) as image:
            return image.convert(self.image_mode or "RGBA")
