"""Session uploads (``PUT /session/``, Slicer's way to segment a film that is not in the datastore) with
archives unpacked safely.

MONAI Label 0.8.5 unpacks an ``uncompress=true`` upload with ``shutil.unpack_archive``, which writes tar members
wherever their names point. Here every member is checked before anything is written, and again by the standard
library's ``data`` extraction filter while writing: a name that is absolute or climbs out with ``..``, a link
that leaves the session folder, a device or FIFO, or an archive past :data:`MAX_MEMBERS` / :data:`MAX_BYTES`
refuses the whole upload with a 400 naming the member, and nothing of it is kept. Zip and tar (plain, gzip,
bzip2, xz) are accepted, recognised by their content. A session id names a folder: one that is not a plain
name (``..``, a path) is never found.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile

from fastapi import HTTPException
from monailabel.utils.sessions import Sessions

from .safety import NAME_PATTERN

MAX_MEMBERS = 10_000
MAX_BYTES = 4 << 30  # unpacked, over all members
_CHUNK = 1 << 20


class ArchiveRefused(ValueError):
    """An uploaded archive that may not be unpacked; the message names the member and why."""

    def __init__(self, member: str, why: str):
        super().__init__(f"archive member {member[:200]!r} refused: {why}; nothing of this upload was kept")


def _check_name(name: str) -> None:
    if not name or "\x00" in name:
        raise ArchiveRefused(name, "empty name or NUL character")
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        raise ArchiveRefused(name, "absolute path")
    if ".." in re.split(r"[/\\]", name):
        raise ArchiveRefused(name, "'..' in its path")


class _Budget:
    def __init__(self):
        self.members = 0
        self.bytes = 0

    def take(self, name: str, size: int) -> None:
        self.members += 1
        self.bytes += max(int(size), 0)
        if self.members > MAX_MEMBERS:
            raise ArchiveRefused(name, f"more than {MAX_MEMBERS} members")
        if self.bytes > MAX_BYTES:
            raise ArchiveRefused(name, f"more than {MAX_BYTES >> 30} GiB unpacked")


def _unpack_tar(path: str, dest: str) -> None:
    try:
        with tarfile.open(path, "r:*") as tar:
            budget = _Budget()
            for member in tar:  # headers in stream order: a huge member is refused before its data is read
                _check_name(member.name)
                budget.take(member.name, member.size)
                try:
                    tarfile.data_filter(member, dest)
                except tarfile.FilterError as exc:
                    raise ArchiveRefused(member.name, str(exc)) from None
            try:
                tar.extractall(dest, filter="data")  # checked again while writing (links extracted earlier count)
            except tarfile.FilterError as exc:
                raise ArchiveRefused(exc.tarinfo.name, str(exc)) from None
    except (tarfile.ReadError, EOFError, OSError) as exc:
        raise ArchiveRefused(os.path.basename(path), f"unreadable tar archive ({exc})") from None


def _unpack_zip(path: str, dest: str) -> None:
    try:
        with zipfile.ZipFile(path) as zf:
            budget = _Budget()
            infos = zf.infolist()
            for info in infos:
                _check_name(info.filename)
                kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the zip tool recorded no Unix file type
                if kind == stat.S_IFLNK:
                    raise ArchiveRefused(info.filename, "a symbolic link")
                if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                    raise ArchiveRefused(info.filename, "not a regular file or folder")
                budget.take(info.filename, info.file_size)
            for info in infos:
                target = os.path.join(dest, *re.split(r"[/\\]", info.filename))
                if info.is_dir():
                    os.makedirs(target, exist_ok=True)
                    continue
                os.makedirs(os.path.dirname(target), exist_ok=True)
                written = 0
                with zf.open(info) as src, open(target, "xb") as out:
                    while chunk := src.read(_CHUNK):
                        written += len(chunk)
                        if written > info.file_size:  # a header that understates its member (a zip bomb)
                            raise ArchiveRefused(info.filename, "more data than its header declares")
                        out.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, RuntimeError) as exc:
        raise ArchiveRefused(os.path.basename(path), f"unreadable zip archive ({exc})") from None


def unpack_archive(path: str) -> str:
    """Unpack a zip or tar archive into a new temporary folder and return it; :class:`ArchiveRefused` (and
    nothing left on disk) when any member is unsafe or the file is not such an archive."""
    dest = tempfile.mkdtemp(prefix="session-")
    try:
        if zipfile.is_zipfile(path):
            _unpack_zip(path, dest)
        else:
            _unpack_tar(path, dest)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest


def _discard_upload(path: str) -> None:
    """Remove a refused upload: MONAI Label's endpoint removes its receiving folder only after a success."""
    folder = os.path.dirname(os.path.realpath(path))
    if os.path.dirname(folder) == os.path.realpath(tempfile.gettempdir()) and os.path.basename(folder).startswith("tmp"):
        shutil.rmtree(folder, ignore_errors=True)
    elif os.path.isfile(path):
        os.unlink(path)


class SafeSessions(Sessions):
    """MONAI Label's session store with checked archives and session ids (see module docstring)."""

    def add_session(self, data_file: str, expiry: int = 0, uncompress: bool = False, session_id=None):
        if uncompress and not os.path.isdir(data_file):
            try:
                data_file = unpack_archive(data_file)
            except ArchiveRefused as exc:
                _discard_upload(data_file)
                raise HTTPException(status_code=400, detail=str(exc)) from None
        return super().add_session(data_file, expiry, False, session_id)

    def get_session(self, session_id: str, update_ts: bool = True, fetch_cache: bool = True):
        if not isinstance(session_id, str) or not NAME_PATTERN.fullmatch(session_id):
            return None
        return super().get_session(session_id, update_ts=update_ts, fetch_cache=fetch_cache)

    def remove_session(self, session_id: str):
        if isinstance(session_id, str) and NAME_PATTERN.fullmatch(session_id):
            super().remove_session(session_id)
