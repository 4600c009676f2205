"""Disk the Space may fill: Gradio's file cache bounded in files and bytes, and no folders left by dead processes.

Gradio keeps every file it caches (uploads, copies of returned files, images it encoded) until its
``delete_cache`` schedule finds them old enough: at full speed, thousands of files and gigabytes an hour.
:class:`GradioCacheLimit` bounds them whatever the pace, after every event, on every upload and on a timer;
:func:`claim_store_folder` lets a new output store delete the stores of processes that died without cleaning up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path

from gradio.utils import get_upload_folder

try:
    import fcntl
except ImportError:  # Windows: folders of dead processes are left to the age limit
    fcntl = None

log = logging.getLogger("mm2latent.space")
_OWNER_FILE = ".owner.lock"


class PruningSet(set):
    """Gradio's set of uploaded files, calling ``on_add`` after every addition (uploads come without an event)."""

    def __init__(self, items=(), on_add=None):
        super().__init__(items)
        self.on_add = on_add

    def update(self, *others) -> None:
        super().update(*others)
        if self.on_add is not None:
            self.on_add()

    def add(self, item) -> None:
        super().add(item)
        if self.on_add is not None:
            self.on_add()


class GradioCacheLimit:
    """Keeps the files Gradio caches for one app to at most ``max_files`` files and ``max_bytes`` bytes.

    It reads Gradio's own record of the files it made (``Blocks.temp_file_sets``), deletes the least recently
    used first (a file's change time: a picture sent back is touched when used, see ``returned_files``), and never
    deletes the files Gradio keeps on purpose (components' initial values, example inputs: ``keep_in_cache``).
    At start (:meth:`remove_orphans`), files in the cache folder that no live record names (left by a previous
    run that was killed) are deleted when older than ``max_age_s`` or beyond the limits.

    Args:
        max_files: the most cached files to keep.
        max_bytes: the most bytes they may take (None: no byte limit).
        max_age_s: files older than this are deleted by the timer (None: only by the limits).
        blocks: the app (can be given later with :meth:`attach`).
    """

    def __init__(self, max_files: int, blocks=None, max_bytes: int | None = None, max_age_s: float | None = None):
        if max_files < 1:
            raise ValueError(f"max_files must be at least 1, got {max_files}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
        self.max_files = max_files
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.blocks = None
        self._lock = threading.Lock()
        self._timer: threading.Thread | None = None
        if blocks is not None:
            self.attach(blocks)

    def attach(self, blocks) -> GradioCacheLimit:
        """Watch ``blocks``: its uploads trigger a prune as they are recorded."""
        self.blocks = blocks
        uploads = getattr(blocks, "upload_file_set", None)
        if isinstance(uploads, set) and not isinstance(uploads, PruningSet) and hasattr(blocks, "temp_file_sets"):
            watched = PruningSet(uploads, on_add=self.prune)
            blocks.upload_file_set = watched
            blocks.temp_file_sets[:] = [watched if file_set is uploads else file_set
                                        for file_set in blocks.temp_file_sets]
        return self

    def _recorded(self) -> tuple[dict[str, list[set]], set[str]]:
        """Gradio's cached files -> the sets naming them, and the files it keeps on purpose."""
        kept_on_purpose = set()
        for block in list(self.blocks.blocks.values()):
            kept_on_purpose.update(getattr(block, "keep_in_cache", ()))
        owners: dict[str, list[set]] = {}
        for file_set in list(self.blocks.temp_file_sets):
            for path in file_set.copy():  # set.copy is atomic; Gradio threads add to these sets
                if path not in kept_on_purpose:
                    owners.setdefault(path, []).append(file_set)
        return owners, kept_on_purpose

    def prune(self) -> int:
        """Delete the least recently used cached files beyond the limits (and beyond the age); returns how many."""
        if self.blocks is None:
            return 0
        with self._lock:
            owners, _ = self._recorded()
            files = []
            for path, sets in owners.items():
                try:
                    status = os.lstat(path)
                except FileNotFoundError:  # deleted by Gradio's own schedule: forget it
                    for file_set in sets:
                        file_set.discard(path)
                    continue
                files.append((status.st_ctime, path, status.st_size))
            doomed = _beyond_limits(files, self.max_files, self.max_bytes, self.max_age_s)
            for path in doomed:
                _remove(path)
                for file_set in owners[path]:
                    file_set.discard(path)
            return len(doomed)

    def remove_orphans(self) -> int:
        """Delete files in Gradio's cache folder that no record of this app names and that are older than
        ``max_age_s`` or beyond the limits (oldest first). Call once the app is built, before serving."""
        if self.blocks is None:
            return 0
        cache = Path(get_upload_folder())
        if not cache.is_dir():
            return 0
        with self._lock:
            owners, kept = self._recorded()
            known = {os.path.realpath(path) for path in (*owners, *kept)}
            orphans = []
            for path in cache.rglob("*"):
                with contextlib.suppress(OSError):
                    if (path.is_file() or path.is_symlink()) and os.path.realpath(path) not in known:
                        status = path.lstat()
                        orphans.append((status.st_ctime, str(path), status.st_size))
            doomed = _beyond_limits(orphans, self.max_files, self.max_bytes, self.max_age_s)
            for path in doomed:
                _remove(path)
        if doomed:
            log.info("Deleted %d files left in Gradio's cache by an earlier run", len(doomed))
        return len(doomed)

    def start(self, every_s: float = 60.0) -> None:
        """Prune every ``every_s`` seconds in a daemon thread (files expire without any event)."""
        if self._timer is not None:
            return

        def run():
            while True:
                time.sleep(every_s)
                try:
                    self.prune()
                except Exception:  # keep pruning whatever one pass met
                    log.exception("Pruning Gradio's cache failed")

        self._timer = threading.Thread(target=run, name="mm2latent-cache-limit", daemon=True)
        self._timer.start()


def _beyond_limits(files: list[tuple[float, str, int]], max_files: int, max_bytes: int | None,
                   max_age_s: float | None) -> list[str]:
    """The paths to delete among (time, path, size): too old, then the oldest until count and bytes fit."""
    files = sorted(files)  # oldest first
    oldest_kept = time.time() - max_age_s if max_age_s is not None else -float("inf")
    doomed = [path for when, path, _ in files if when < oldest_kept]
    files = [entry for entry in files if entry[0] >= oldest_kept]
    total = sum(size for _, _, size in files)
    while files and (len(files) > max_files or (max_bytes is not None and total > max_bytes)):
        _, path, size = files.pop(0)
        doomed.append(path)
        total -= size
    return doomed


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    with contextlib.suppress(OSError):  # Gradio's per-file hash folder, when now empty
        os.rmdir(os.path.dirname(path))


def claim_store_folder(root: Path, max_age_s: float = 3600.0):
    """Mark ``root`` (a ``mm2latent-space-*`` output store) as this process's and delete sibling stores whose
    process is gone (their lock is free: the system releases it when a process dies, even by kill -9); a
    sibling without a lock file is deleted when untouched for ``max_age_s``.

    Returns the open lock file, which must stay open as long as the store is used (None without ``fcntl``).
    """
    if fcntl is None:
        return None
    owner = open(root / _OWNER_FILE, "w")  # noqa: SIM115  (held open: it is the lock)
    fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
    for sibling in root.parent.glob("mm2latent-space-*"):
        if sibling == root or not sibling.is_dir():
            continue
        try:
            if not (sibling / _OWNER_FILE).exists():  # just created, or a version without locks: by its age
                if time.time() - sibling.stat().st_mtime < max_age_s:
                    continue
            else:
                with open(sibling / _OWNER_FILE) as other:
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: its process is gone
        except OSError:  # locked (a live process uses it), or gone already
            continue
        shutil.rmtree(sibling, ignore_errors=True)
        log.info("Deleted %s, the output store of a process that is gone", sibling.name)
    return owner
