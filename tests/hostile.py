"""Hostile inputs, generated (nothing large is committed): a deflate bomb in one DICOM file, zip bombs,
damaged zips, raw HTTP requests, and stopping the server they were sent to. Used by tests/test_web.py, tests/test_dicom.py and benchmarks/hostile.py; the
server's memory as the benchmark and the tests measure it."""
from __future__ import annotations

import io
import socket
import struct
import subprocess
import zipfile
import zlib
from pathlib import Path

DEFLATED = "1.2.840.10008.1.2.1.99"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0" if vr in (b"OB", b"UI") else b" "
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
        return struct.pack("<HH2sHI", group, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def deflate_bomb(inflated_mib: int, sop_uid: str = "ID_deflatebomb") -> bytes:
    """A DICOM file in the Deflated Explicit VR Little Endian syntax (1.2.840.10008.1.2.1.99): a few CT
    header elements, then a private OB element of `inflated_mib` MiB of zeros; about 1 kB per MiB on disk."""
    meta_body = (_element(2, 1, b"OB", b"\0\1") + _element(2, 2, b"UI", CT_IMAGE.encode())
                 + _element(2, 3, b"UI", sop_uid.encode()) + _element(2, 0x10, b"UI", DEFLATED.encode()))
    meta = struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(meta_body)) + meta_body
    header = (_element(8, 0x16, b"UI", CT_IMAGE.encode()) + _element(8, 0x18, b"UI", sop_uid.encode())
              + _element(8, 0x60, b"CS", b"CT") + _element(0x10, 0x20, b"LO", b"ID_bombpatient"))
    size = inflated_mib << 20
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts = [comp.compress(header + struct.pack("<HH2sHI", 0x0011, 0x1010, b"OB", 0, size))]
    zeros = bytes(1 << 20)
    parts += [comp.compress(zeros) for _ in range(inflated_mib)]
    parts.append(comp.flush())
    return b"\0" * 128 + b"DICM" + meta + b"".join(parts)


def zip_of(members: dict, compression=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def zip_bomb(entries: int, mib: int = 1, dicom_like: bool = False) -> bytes:
    """`entries` members of `mib` MiB of zeros each (or of a DICOM preamble + 'DICM' + zeros), written
    with one deflate of the data reused for every member: 4,000 entries of 1 MiB in a few MB and a second."""
    data = bytes(mib << 20)
    if dicom_like:
        data = bytes(128) + b"DICM" + data[132:]
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    packed = comp.compress(data) + comp.flush()
    crc = zlib.crc32(data)
    out, central = io.BytesIO(), []
    for i in range(entries):
        name = f"bomb/{i:05d}".encode()
        offset = out.tell()
        out.write(struct.pack("<4sHHHHHIIIHH", b"PK\3\4", 20, 0, 8, 0, 0x21, crc, len(packed), len(data),
                              len(name), 0) + name + packed)
        central.append(struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\1\2", 20, 20, 0, 8, 0, 0x21, crc, len(packed),
                                   len(data), len(name), 0, 0, 0, 0, 0, offset) + name)
    start = out.tell()
    out.write(b"".join(central))
    size = out.tell() - start
    out.write(struct.pack("<4sHHHHIIH", b"PK\5\6", 0, 0, entries, entries, size, start, 0))
    return out.getvalue()


def damaged_zips(member: bytes) -> dict:
    """name -> a zip of one member that zipfile cannot read: bad signature, bad CRC, an entry larger than
    its header says, the encrypted flag, deflate64 (method 9)."""
    plain = zip_of({"SECRET-NAME/IM0001": member}, zipfile.ZIP_STORED)
    out = {}
    b = bytearray(plain)
    b[0:4] = b"XX\3\4"  # the local header's signature
    out["bad signature"] = bytes(b)
    b = bytearray(plain)
    data_at = 30 + len("SECRET-NAME/IM0001")
    b[data_at + 200] ^= 0xFF
    out["bad CRC"] = bytes(b)
    deflated = zip_of({"SECRET-NAME/IM0001": member})
    b = bytearray(deflated)
    central = b.rindex(b"PK\1\2")  # declare fewer bytes than the entry inflates to (local and central)
    struct.pack_into("<I", b, 22, 100)
    struct.pack_into("<I", b, central + 24, 100)
    out["larger than its header"] = bytes(b)
    for name, flag, method in (("encrypted", 0x1, None), ("deflate64", None, 9)):
        b = bytearray(deflated)
        central = b.rindex(b"PK\1\2")
        for at in (6, central + 8):  # general purpose flags
            if flag:
                struct.pack_into("<H", b, at, struct.unpack_from("<H", b, at)[0] | flag)
            if method:
                struct.pack_into("<H", b, at + 2, method)
        out[name] = bytes(b)
    return out


def raw_request(host: str, port: int, data: bytes, *, wait: float = 10.0) -> tuple[bytes, float]:
    """Send raw bytes, read until the server closes the connection or `wait` s pass: (reply, seconds)."""
    import time
    t0 = time.time()
    import select
    with socket.create_connection((host, port), timeout=wait) as s:
        reply = b""
        try:
            for i in range(0, len(data), 1 << 16):
                if select.select([s], [], [], 0)[0]:
                    break  # answered before the request ended: read the answer
                s.sendall(data[i:i + (1 << 16)])
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            while chunk := s.recv(65536):
                reply += chunk
        except (TimeoutError, socket.timeout):
            pass
        except ConnectionResetError:
            pass
    return reply, time.time() - t0


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Stop a server process: SIGTERM (it shuts down cleanly), SIGKILL when it has not ended in `timeout` s."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


# --- the server's memory ---------------------------------------------------------------------------------
def anon_kb(pid: int) -> int:
    """The process's anonymous memory as proportional set size (Pss_Anon + Pss_Shmem of smaps_rollup): a page
    shared by n processes counts 1/n in each (the upload readers are forked from one forkserver and share
    its pages), so the sum over the tree is the memory the server really took.

    Why not the whole PSS: it counts the libraries' file pages too, divided by every process on
    the machine that maps them, so it moved by -165 to +150 MB within one run as other programs that load
    torch started and stopped (measured on this VM while a test run came and went). The libraries' pages
    are clean, shared and reclaimable; what an attack can grow is anonymous memory."""
    try:
        fields = {}
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("Pss", "Pss_Anon", "Pss_Shmem"):
                fields[key] = int(value.split()[0])
        if "Pss_Anon" in fields:
            return fields["Pss_Anon"] + fields.get("Pss_Shmem", 0)
        return fields.get("Pss", 0)  # kernels before 5.x: no split
    except OSError:
        pass
    return 0


def process_tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*") if Path(f"/proc/{p}/task").is_dir() else []:
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def anon_mb(pid: int) -> float:
    """The server process and every process under it (anonymous PSS summed), MB."""
    return sum(anon_kb(p) for p in process_tree(pid)) / 1024
