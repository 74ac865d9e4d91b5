"""RAW_DATA_DIR as the competition data comes: its folder, or the .zip as downloaded, read in place.

The archive is about 180 GB and its extracted files 450 GB more, so the zip
is never extracted. Its central directory is read once (the standard
library's zipfile); the members of a split are kept as an index
(`zip_members.parquet` beside the split's slice table, so training and a
rerun do not read the directory again). A worker reads a member by its
offset through its own handle on the archive (`Member.read`): it checks the
member's local header, then zipfile's own decompressor reads it and checks
its CRC (zipfile.ZipExtFile). A member that is damaged gets prepare's
rejection reasons (`unreadable`, `too_large`); an archive that zipfile
cannot open (cut short, damaged directory) or whose names climb out of it
(`../`, absolute) is a one-line RawDataError, before any work.

Deflated members, nearly all of the archive, are inflated by ISA-L
(`isal`, BENCHMARKS.md: about 3x zlib's speed, the largest cost of reading
from the zip) when it is installed, with the same checks (sizes, CRC);
stored members and a machine without isal go through zipfile.

A folder keeps working as it always did: a file is its path.
"""
from __future__ import annotations

import io
import json
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from .dicom import Rejected

try:
    from isal import isal_zlib as fast_zlib  # the same API as zlib, ISA-L's inflate and crc32
except ImportError:  # optional: zipfile's zlib reads the same bytes, slower
    fast_zlib = None

TRAIN_DIR, TEST_DIR = "stage_2_train", "stage_2_test"
LABELS_CSV = "stage_2_train.csv"
SAMPLE_CSV = "stage_2_sample_submission.csv"
ZIP_INDEX = "zip_members.parquet"  # a split's members, beside its slice table
INDEX_KEY = "zip_members.json"     # the archive the index was made from (path, size, mtime)
INDEX_COLUMNS = ("name", "offset", "compress_size", "file_size", "crc", "method", "flags")


class RawDataError(RuntimeError):
    """RAW_DATA_DIR cannot be read at all; the message says why, in one line."""


@dataclass(frozen=True)
class Member:
    """One file inside the archive, as the index holds it: what a worker needs to read it by offset."""
    archive: str
    name: str           # the member's full name in the archive
    offset: int         # of its local header
    compress_size: int
    file_size: int
    crc: int
    method: int         # zipfile.ZIP_STORED, ZIP_DEFLATED, ...
    flags: int

    def read(self, limit: int, handle=None) -> bytes:
        """The member's bytes, CRC checked; raises Rejected (prepare's reasons) when it cannot be used.
        handle: an open file of the archive to read through (default: this process's own, kept open)."""
        if self.file_size > limit:
            raise Rejected("too_large", f"zip member of {self.file_size:,} bytes, more than a slice can take "
                                        f"({limit:,})")
        if self.flags & 0x1:
            raise Rejected("unreadable", "zip member is encrypted")
        try:
            f = _handle(self.archive) if handle is None else handle
        except OSError as exc:
            raise Rejected("unreadable", f"the archive cannot be opened: {type(exc).__name__}: "
                                         f"{exc.strerror or exc}") from None
        try:
            f.seek(self.offset)
            head = f.read(zipfile.sizeFileHeader)
            if len(head) != zipfile.sizeFileHeader:
                raise EOFError("the archive ends inside the member's header")
            fields = struct.unpack(zipfile.structFileHeader, head)
            if fields[0] != zipfile.stringFileHeader:
                raise zipfile.BadZipFile("bad local header signature")
            name_len, extra_len = fields[10], fields[11]
            name = f.read(name_len).decode("utf-8" if fields[3] & 0x800 else "cp437", "replace")
            if name != self.name:  # as zipfile checks: an offset into another member (a crafted archive)
                raise zipfile.BadZipFile(f"the local header at this offset names another member ({name!r})")
            f.seek(extra_len, os.SEEK_CUR)
            if fast_zlib is not None and self.method == zipfile.ZIP_DEFLATED:
                return self._inflate(f.read(self.compress_size))
            info = zipfile.ZipInfo(self.name)
            info.compress_type, info.compress_size, info.file_size = self.method, self.compress_size, self.file_size
            info.CRC, info.flag_bits = self.crc, self.flags
            with zipfile.ZipExtFile(f, "rb", info) as member:
                data = member.read(self.file_size + 1)
        except EOFError as exc:
            raise Rejected("truncated", f"zip member cut short: {exc}") from None
        except (zipfile.BadZipFile, zlib.error, NotImplementedError, OSError, ValueError) as exc:
            raise Rejected("unreadable", f"zip member damaged: {type(exc).__name__}: {exc}") from None
        if len(data) != self.file_size:
            raise Rejected("truncated", f"zip member holds {len(data):,} of its {self.file_size:,} bytes")
        return data

    def _inflate(self, compressed: bytes) -> bytes:
        """A deflated member's bytes by ISA-L, checked as zipfile checks them: whole, of the declared size,
        and of the declared CRC."""
        if len(compressed) != self.compress_size:
            raise Rejected("truncated", f"zip member cut short: {len(compressed):,} of its {self.compress_size:,} "
                                        "compressed bytes")
        try:
            inflater = fast_zlib.decompressobj(-15)
            data = inflater.decompress(compressed, self.file_size + 1)
        except fast_zlib.error as exc:
            raise Rejected("unreadable", f"zip member damaged: {exc}") from None
        if len(data) != self.file_size or not inflater.eof:
            raise Rejected("unreadable", f"zip member damaged: inflates to {len(data):,} bytes, not the "
                                         f"{self.file_size:,} its header declares")
        if fast_zlib.crc32(data) != self.crc:
            raise Rejected("unreadable", "zip member damaged: Bad CRC-32")
        return data


_HANDLES: dict[tuple[str, int], tuple[io.BufferedReader, tuple]] = {}


def _identity(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _handle(archive: str) -> io.BufferedReader:
    """This process's own handle on the archive (a DataLoader or prepare worker never shares its parent's),
    opened again when another file took the archive's path (a study zip replaced by the next one)."""
    key = (archive, os.getpid())
    now = _identity(os.stat(archive))
    f, seen = _HANDLES.get(key, (None, None))
    if f is None or seen != now:
        if f is not None:
            f.close()
        f = open(archive, "rb")
        _HANDLES[key] = f, _identity(os.fstat(f.fileno()))
    return f


def readable(ref, max_bytes: int):
    """A file reference -> what ich.dicom reads: a path as it is, a zip member as its bytes (Rejected when damaged)."""
    return ref.read(max_bytes) if isinstance(ref, Member) else ref


def list_files(folder: Path) -> list[str]:
    """Every non-hidden entry but sub-folders, sorted: a stray file, a dangling link or a device
    is listed, so that it is rejected with a reason (rejected.csv), never skipped in silence."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and not p.is_dir())


class FolderData:
    """RAW_DATA_DIR as a folder: stage_2_train/, stage_2_test/, the csv files."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def __str__(self) -> str:
        return str(self.root)

    def where(self, split_dir: str) -> str:
        return str(self.root / split_dir)

    def names(self, split_dir: str, clean_dir: Path | None = None) -> list[str] | None:
        """The split's file names, sorted (hidden files and sub-folders left out); None: no such folder."""
        folder = self.root / split_dir
        return list_files(folder) if folder.is_dir() else None

    def refs(self, split_dir: str, names, clean_dir: Path | None = None) -> list:
        folder = self.root / split_dir
        return [str(folder / name) for name in names]

    def csv(self, name: str):
        """A csv file at the top of the data: its path, or None when absent."""
        path = self.root / name
        return path if path.is_file() else None

    def hint(self, split_dir: str) -> str:
        nested = sorted(self.root.glob(f"*/{split_dir}")) if self.root.is_dir() else []
        return f"; found {nested[0]}: point RAW_DATA_DIR at {nested[0].parent}" if nested else ""


class ZipData:
    """RAW_DATA_DIR as the competition .zip: the same splits and csv files, read from its members.

    The data may sit under a folder inside the archive (Kaggle's download
    holds rsna-intracranial-hemorrhage-detection/...): the shallowest folder
    that holds a split folder or the label csv is the root.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._infos: list[zipfile.ZipInfo] | None = None
        self._root: str | None = None

    def __str__(self) -> str:
        return str(self.path)

    def where(self, split_dir: str) -> str:
        return f"{self.path}:{self._prefix()}{split_dir}/"

    def _read_directory(self) -> list[zipfile.ZipInfo]:
        if self._infos is None:
            try:
                with zipfile.ZipFile(self.path) as z:
                    infos = z.infolist()
            except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
                raise RawDataError(f"RAW_DATA_DIR {self.path} is not a readable zip archive (damaged or cut short: "
                                   f"{exc}); download it again or point RAW_DATA_DIR at the extracted folder") from None
            bad = [i.filename for i in infos if _climbs(i.filename)]
            if bad:
                raise RawDataError(f"RAW_DATA_DIR {self.path} holds {len(bad)} member name(s) that climb out of the "
                                   f"archive (e.g. {bad[0]!r}): not a competition download, not read")
            self._infos = infos
        return self._infos

    def _prefix(self) -> str:
        if self._root is None:
            roots = set()
            for info in self._read_directory():
                parts = PurePosixPath(info.filename).parts
                if len(parts) >= 2 and parts[-2] in (TRAIN_DIR, TEST_DIR):
                    roots.add(parts[:-2])
                elif parts and parts[-1] in (LABELS_CSV, SAMPLE_CSV):
                    roots.add(parts[:-1])
            root = min(roots, key=len, default=())
            self._root = "".join(f"{p}/" for p in root)
        return self._root

    def _split_index(self, split_dir: str) -> pd.DataFrame:
        prefix = f"{self._prefix()}{split_dir}/"
        rows = {}
        for info in self._read_directory():
            name = info.filename
            if not name.startswith(prefix) or info.is_dir():
                continue
            rest = name[len(prefix):]
            if "/" in rest or rest.startswith(".") or not rest:
                continue  # a sub-folder's file or a hidden one: not in the split, as in a folder
            rows[rest] = (name, info.header_offset, info.compress_size, info.file_size, info.CRC,
                          info.compress_type, info.flag_bits)  # a repeated name: the last, as zipfile reads it
        index = pd.DataFrame([(k, *v) for k, v in sorted(rows.items())],
                             columns=["file", *INDEX_COLUMNS])
        return index.astype({c: np.int64 for c in INDEX_COLUMNS[1:]})

    def _identity(self) -> dict:
        st = self.path.stat()
        return {"archive": str(self.path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def index(self, split_dir: str, clean_dir: Path | None = None) -> pd.DataFrame:
        """The split's members (file, name, offset, sizes, crc, method, flags), read from clean_dir's saved
        index when it was made from this very archive, else from the central directory (and saved there)."""
        key = {**self._identity(), "split": split_dir}
        if clean_dir is not None:
            try:
                if json.loads((Path(clean_dir) / INDEX_KEY).read_text()) == key:
                    return pd.read_parquet(Path(clean_dir) / ZIP_INDEX)
            except (OSError, ValueError):
                pass
        index = self._split_index(split_dir)
        if clean_dir is not None and len(index):
            from .cache import write_atomic
            try:
                Path(clean_dir).mkdir(parents=True, exist_ok=True)
                write_atomic(Path(clean_dir) / ZIP_INDEX, lambda p: index.to_parquet(p, index=False))
                write_atomic(Path(clean_dir) / INDEX_KEY, lambda p: p.write_text(json.dumps(key, indent=1)))
            except OSError:
                pass  # a read-only clean dir: the index is built again next time
        return index

    def names(self, split_dir: str, clean_dir: Path | None = None) -> list[str] | None:
        index = self.index(split_dir, clean_dir)
        return index["file"].tolist() if len(index) else None

    def refs(self, split_dir: str, names, clean_dir: Path | None = None) -> list[Member]:
        index = self.index(split_dir, clean_dir).set_index("file")
        missing = [n for n in names if n not in index.index]
        if missing:
            raise RawDataError(f"{len(missing)} file(s) of the slice table are not in {self.where(split_dir)} "
                               f"(e.g. {missing[0]}): is RAW_DATA_DIR the archive the data was prepared from?")
        rows = index.loc[list(names)]
        archive = str(self.path.resolve())
        return [Member(archive, r.name_, int(r.offset), int(r.compress_size), int(r.file_size), int(r.crc),
                       int(r.method), int(r.flags))
                for r in rows.rename(columns={"name": "name_"}).itertuples()]

    def csv(self, name: str):
        """A csv member at the root of the data, in memory (a few MB to 100 MB), or None when absent."""
        target = f"{self._prefix()}{name}"
        if not any(i.filename == target for i in self._read_directory()):
            return None
        try:
            with zipfile.ZipFile(self.path) as z:
                buffer = io.BytesIO(z.read(target))
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
            raise RawDataError(f"{name} in {self.path} cannot be read (damaged: {exc})") from None
        buffer.name = f"{self.path}:{target}"
        return buffer

    def hint(self, split_dir: str) -> str:
        return ""


def _climbs(name: str) -> bool:
    p = PurePosixPath(name.replace("\\", "/"))
    return p.is_absolute() or ".." in p.parts or (len(name) > 1 and name[1] == ":")


def open_raw(path: Path) -> FolderData | ZipData:
    """RAW_DATA_DIR -> its reader: a folder, or a zip archive (by its content, whatever its name)."""
    path = Path(path)
    if path.is_dir():
        return FolderData(path)
    if path.is_file():
        if zipfile.is_zipfile(path) or path.suffix.lower() == ".zip":
            return ZipData(path)
        raise RawDataError(f"RAW_DATA_DIR {path} is a file but no zip archive: give the competition folder or its "
                           ".zip as downloaded")
    raise RawDataError(f"RAW_DATA_DIR points to {path}, which is neither an existing folder nor a zip archive")
