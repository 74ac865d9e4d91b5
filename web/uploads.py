"""Where uploads go and how they are read: one server-owned folder, request folders swept after a crash,
a multipart body streamed straight to numbered files with its bytes counted and a read timeout.

- `WorkDir`: one folder owned by this server (mode 0700; refused when it is
  a link or another user's). Each request gets `req_*` inside it with a
  marker file naming the server's process id; the folder is deleted when the
  request ends, on error too. At start-up `sweep` deletes the `req_*` folders
  whose server is gone (a kill -9), never anything else, and never those of
  a server still running on the same folder.
- `receive_files`: the multipart body, parsed as it arrives (python-multipart,
  as Starlette does) into `00000`, `00001`, ... in the request folder: no
  copy in a system temporary file. The bytes that actually arrive are counted
  (a chunked body with a small Content-Length cannot pass the cap), files are
  counted, and a body that stalls for `body_timeout` seconds is dropped.
  Only files whose part ended are returned (an upload cut short has none).
"""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from python_multipart.multipart import MultipartParser, parse_options_header

MARKER = ".ich-serve-request"
PREFIX = "req_"


class UploadError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class ClientGone(Exception):
    """The client closed the connection before the body ended."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WorkDir:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else Path(tempfile.gettempdir()) / f"ich-serve-{os.getuid()}"
        try:
            self.root.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            pass
        st = os.lstat(self.root)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise RuntimeError(f"{self.root} is not a folder of this user (a link, a file or another user's): "
                               "give serve.py --work-dir a folder of your own")
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(self.root, 0o700)
        self.swept = self.sweep()

    def sweep(self) -> int:
        """Delete the request folders of servers that are gone; -> how many."""
        n = 0
        for d in self.root.iterdir():
            if not d.name.startswith(PREFIX) or d.is_symlink() or not d.is_dir():
                continue
            try:
                pid = int((d / MARKER).read_text().strip() or 0)
            except (OSError, ValueError):
                pid = None  # no marker yet: made a moment before a crash, or being made now
                if time.time() - d.stat().st_mtime < 60:
                    continue
            if pid is None or pid == os.getpid() or not _alive(pid):
                shutil.rmtree(d, ignore_errors=True)
                n += 1
        return n

    @contextmanager
    def request(self):
        folder = Path(tempfile.mkdtemp(prefix=PREFIX, dir=self.root))
        try:
            (folder / MARKER).write_text(str(os.getpid()))
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def safe_name(name: str | None, i: int) -> str:
    """The uploaded name, for reporting only: no folders, no control characters, bounded length."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = re.sub(r"[\x00-\x1f\x7f]", "", base).strip()[:200]
    return base or f"file {i + 1}"


class _Parts:
    """python-multipart callbacks: each file part of field `files` goes to its own numbered file."""

    def __init__(self, folder: Path, max_files: int):
        self.folder, self.max_files = folder, max_files
        self.done: list[tuple[str, Path]] = []
        self.n_files, self.out, self.name = 0, None, None
        self.header_name, self.header_value, self.disposition = b"", b"", b""

    def callbacks(self) -> dict:
        return {"on_part_begin": self.part_begin, "on_part_data": self.part_data, "on_part_end": self.part_end,
                "on_header_field": self.header_field, "on_header_value": self.header_value_,
                "on_header_end": self.header_end, "on_headers_finished": self.headers_finished}

    def part_begin(self):
        self.disposition, self.out = b"", None

    def header_field(self, data, start, end):
        self.header_name += data[start:end]
        if len(self.header_name) > 1024:
            raise UploadError(400, "a part header of the upload is too long")

    def header_value_(self, data, start, end):
        self.header_value += data[start:end]
        if len(self.header_value) > 8192:
            raise UploadError(400, "a part header of the upload is too long")

    def header_end(self):
        if self.header_name.lower() == b"content-disposition":
            self.disposition = self.header_value
        self.header_name, self.header_value = b"", b""

    def headers_finished(self):
        _, options = parse_options_header(self.disposition)
        if options.get(b"name") != b"files" or b"filename" not in options:
            return  # another field: its data is dropped
        if self.n_files >= self.max_files:
            raise UploadError(400, f"the upload holds more than {self.max_files} files")
        self.name = safe_name(options[b"filename"].decode("utf-8", "replace"), self.n_files)
        self.path = self.folder / f"{self.n_files:05d}"
        self.out = open(self.path, "wb")
        self.n_files += 1

    def part_data(self, data, start, end):
        if self.out is not None:
            self.out.write(data[start:end])

    def part_end(self):
        if self.out is not None:
            self.out.close()
            self.done.append((self.name, self.path))
            self.out = None

    def close(self):
        if self.out is not None:
            self.out.close()
            self.out = None


async def receive_files(request, folder: Path, *, max_bytes: int, max_files: int,
                        body_timeout: float, pace=None) -> list[tuple[str, Path]]:
    """The upload's complete files as (name as uploaded, path in folder); UploadError or ClientGone.
    pace: an async callable awaited before each chunk is read (web.deps.Slots.yield_to_smaller)."""
    ctype, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise UploadError(400, "send the files as multipart/form-data in the field 'files'")
    parts = _Parts(folder, max_files)
    parser = MultipartParser(boundary, parts.callbacks())
    received = 0
    stream = request.stream().__aiter__()
    try:
        while True:
            if pace is not None:
                await pace()
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), body_timeout)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise UploadError(408, f"the upload stalled: nothing arrived for {body_timeout:g} s") from None
            except Exception as exc:  # starlette's ClientDisconnect
                if type(exc).__name__ == "ClientDisconnect":
                    raise ClientGone() from None
                raise
            received += len(chunk)
            if received > max_bytes:
                raise UploadError(413, f"the upload is larger than {max_bytes >> 20} MB")
            try:
                parser.write(chunk)
            except UploadError:
                raise
            except Exception as exc:  # noqa: BLE001 - python-multipart's errors on a malformed body
                raise UploadError(400, f"the upload could not be read (not a well-formed file upload: "
                                       f"{type(exc).__name__})") from None
        try:
            parser.finalize()
        except Exception:  # noqa: BLE001 - a body cut short: its last part did not end
            pass
    finally:
        parts.close()
    return parts.done
