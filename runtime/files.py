"""Reading user-supplied files without trusting them: size first, then bytes, then structure.

Every loader of a plan, a model config, a bundle index, an engine or a noise file goes through
here, so a FIFO, ``/dev/zero``, a directory, a 10 GB "plan" or a JSON bomb (a 5,000-digit
integer, 100,000 nested lists) is refused with one line that names the file and the problem,
before anything large is read or allocated.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import tempfile
from typing import Any

from ..errors import FewstepError

MiB = 1 << 20
# A plan of 1,000 rows with K = 10 is ~300 kB of JSON; configs and indexes are a few kB.
MAX_JSON_BYTES = 16 * MiB
MAX_JSON_DEPTH = 64  # plans nest 4 deep (plan → rows → row → list); configs a few more
MAX_INT_DIGITS = 30  # beyond any count, seed or size fewstep reads from a JSON file
# Configs other libraries write (diffusers, transformers): Hugging Face's "no limit" model_max_length is
# int(1e30), 31 digits; still far below the lengths that make int() slow.
MAX_FOREIGN_INT_DIGITS = 64


class FileError(FewstepError):
    """A user-supplied file that cannot be read as what it claims to be."""


def check_regular(path: str | os.PathLike, what: str) -> int:
    """The size of ``path`` if it is a regular file; else one clear error (FIFOs and devices would hang
    or never end, directories are a common slip)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise FileError(f"{what} {path}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise FileError(f"{what} {path}: is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise FileError(f"{what} {path}: not a regular file (a pipe, socket or device)")
    return st.st_size


def read_bytes(path: str | os.PathLike, what: str, limit: int) -> bytes:
    """All of a regular file of at most ``limit`` bytes."""
    size = check_regular(path, what)
    if size > limit:
        raise FileError(f"{what} {path}: {size:,} bytes, more than the {limit:,} a {what} may have")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise FileError(f"{what} {path}: {exc.strerror}") from None
    if len(data) > limit:  # grew while we read it
        raise FileError(f"{what} {path}: more than the {limit:,} bytes a {what} may have")
    return data


def _int_parser(max_digits: int):
    def parse(s: str) -> int:
        if len(s.lstrip("-")) > max_digits:
            raise FileError(f"an integer of {len(s)} digits")
        return int(s)

    return parse


def _parse_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v):
        raise FileError(f"a number out of float64 range ({s[:24]})")
    return v


def _reject_constant(name: str):
    raise FileError(f"{name} is not a valid number (JSON has no NaN or Infinity)")


def parse_json(text: str | bytes, what: str, foreign: bool = False) -> Any:
    """Strict JSON: no NaN/Infinity, no numbers outside float64, no absurd integers or nesting.

    ``foreign``: a config another library wrote, read as that library reads it: NaN / Infinity / -Infinity as
    Python's json writes them (diffusers saves ``"lambda_min_clipped": -Infinity`` in DPMSolverMultistepScheduler
    configs) and integers up to ``MAX_FOREIGN_INT_DIGITS`` digits. fewstep's own files: never."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise FileError(f"{what}: not UTF-8 text") from None
    # Bracket depth before parsing: the json module recurses and would hit Python's stack limit.
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH:
        depth = peak = 0
        in_str = esc = False
        for ch in text:
            if in_str:
                esc, in_str = (False, True) if esc else (ch == "\\", ch != '"')
            elif ch == '"':
                in_str = True
            elif ch in "[{":
                depth += 1
                peak = max(peak, depth)
                if peak > MAX_JSON_DEPTH:
                    raise FileError(f"{what}: nested more than {MAX_JSON_DEPTH} levels deep")
            elif ch in "]}":
                depth -= 1
    try:
        obj = json.loads(text, parse_int=_int_parser(MAX_FOREIGN_INT_DIGITS if foreign else MAX_INT_DIGITS),
                         parse_float=_parse_float, parse_constant=float if foreign else _reject_constant)
    except FileError as exc:
        raise FileError(f"{what}: {exc}") from None
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise FileError(f"{what}: not valid JSON ({str(exc).splitlines()[0][:200]})") from None
    return obj


def load_json(path: str | os.PathLike, what: str, limit: int = MAX_JSON_BYTES, foreign: bool = False) -> Any:
    return parse_json(read_bytes(path, what, limit), f"{what} {path}", foreign)


def read_npy(path: str | os.PathLike, what: str, max_elements: int):
    """A numeric .npy array (never pickled objects), its header checked against the file size and
    ``max_elements`` before the data is read."""
    import numpy as np
    from numpy.lib import format as npf

    size = check_regular(path, what)
    try:
        with open(path, "rb") as f:
            try:
                version = npf.read_magic(f)
            except ValueError:
                raise FileError(f"{what} {path}: not a .npy file (no NumPy magic string)") from None
            try:
                read = npf.read_array_header_1_0 if version == (1, 0) else npf.read_array_header_2_0
                shape, _, dtype = read(f, max_header_size=10_000)
            except (ValueError, SyntaxError) as exc:
                raise FileError(f"{what} {path}: unreadable .npy header ({one_line(exc, 120)})") from None
            if dtype.hasobject:
                raise FileError(f"{what} {path}: holds Python objects (pickled data), not numbers")
            n = math.prod(shape)
            if n > max_elements:
                raise FileError(f"{what} {path}: its header claims {n:,} values; at most {max_elements:,}")
            if f.tell() + n * dtype.itemsize > size:
                raise FileError(f"{what} {path}: truncated ({size:,} bytes, the header promises "
                                f"{f.tell() + n * dtype.itemsize:,})")
            f.seek(0)
            return np.load(f, allow_pickle=False)
    except OSError as exc:
        raise FileError(f"{what} {path}: {exc.strerror}") from None


# Bytes per value of safetensors' dtypes: a header's shapes must account for its data offsets exactly. F4 / F6
# pack below a byte; for those the offsets only bound the count.
ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 1,
               "F6_E2M3": 1, "F6_E3M2": 1}
_ST_PACKED = frozenset(("F4", "F6_E2M3", "F6_E3M2"))


def read_span(f, lo: int, hi: int, what: str, error: type[FewstepError] = FileError) -> bytearray:
    """Bytes [lo, hi) of an open file (a tensor's range from ``safetensors_header``), writable for
    ``np.frombuffer`` / ``torch.frombuffer``; a file that shrank since its header was read is one ``error``."""
    f.seek(lo)
    buf = bytearray(hi - lo)
    if f.readinto(buf) != hi - lo:
        raise error(f"{what}: shorter than its header says (it changed while it was read)")
    return buf


def safetensors_header(f, size: int, what: str, max_header: int,
                       error: type[FewstepError] = FileError) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """Name → (dtype, shape, start, end) of the tensors in an open safetensors file of ``size`` bytes, ``start``
    and ``end`` absolute file offsets; ``f`` is left just past the header. Checked before any data is read: a
    strict-JSON header of at most ``max_header`` bytes whose entries' dtypes and shapes account for their byte
    ranges, each inside the file and no two sharing bytes (safetensors' own rules, the ones fewstep-run's reader
    applies). Problems are one ``error`` naming ``what`` (e.g. "weights file PATH")."""
    head = f.read(8)
    hlen = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 < hlen <= min(max_header, size - 8):
        raise error(f"{what}: not a safetensors file (header of {hlen:,} bytes in a file of {size:,})")
    raw = f.read(hlen)
    if len(raw) != hlen:
        raise error(f"{what}: shorter than its header (the file changed while it was read)")
    header = parse_json(raw, f"{what} header", foreign=True)
    if not isinstance(header, dict):
        raise error(f"{what}: its header is not a JSON object")
    base = 8 + hlen
    out = {}
    for name, ent in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(ent, dict) and ent.get("dtype") in ST_ITEMSIZE and isinstance(ent.get("shape"), list)
                and all(type(s) is int and s >= 0 for s in ent["shape"]) and isinstance(ent.get("data_offsets"), list)
                and len(ent["data_offsets"]) == 2 and all(type(o) is int for o in ent["data_offsets"])):
            raise error(f"{what}: tensor {name[:80]!r} has a malformed header entry (it needs a known dtype, a shape "
                        "of non-negative integers and two integer data offsets)")
        dtype, shape, (lo, hi) = ent["dtype"], tuple(ent["shape"]), ent["data_offsets"]
        n = math.prod(shape)
        if not (0 <= lo <= hi <= size - base
                and (hi - lo == n * ST_ITEMSIZE[dtype] or dtype in _ST_PACKED and n <= 2 * (hi - lo))):
            raise error(f"{what}: tensor {name[:80]!r}: its data offsets do not match its shape and dtype or lie "
                        "outside the file")
        out[name] = (dtype, shape, base + lo, base + hi)
    spans = sorted((lo, hi, name) for name, (_, _, lo, hi) in out.items() if hi > lo)
    for (_, a_hi, a), (b_lo, _, b) in zip(spans, spans[1:]):
        if b_lo < a_hi:
            raise error(f"{what}: tensors {a[:80]!r} and {b[:80]!r} share bytes")
    return out


def check_writable_file(path: str | os.PathLike, flag: str = "--out") -> None:
    """Before any work: ``path`` can be written (its directory exists and is writable, and it is not a
    directory), so a long fit or export never ends in "permission denied"."""
    p = os.path.abspath(os.fspath(path))
    if os.path.isdir(p):
        raise FileError(f"{flag} {path}: is a directory; give a file name")
    d = os.path.dirname(p)
    if not os.path.isdir(d):
        raise FileError(f"{flag} {path}: directory {d} does not exist")
    if not os.access(d, os.W_OK | os.X_OK) or (os.path.exists(p) and not os.access(p, os.W_OK)):
        raise FileError(f"{flag} {path}: not writable")


def check_writable_dir(path: str | os.PathLike, flag: str = "--out") -> None:
    """Before any work: ``path`` is, or can be made, a writable directory (created only when written)."""
    probe = os.path.abspath(os.fspath(path))
    if os.path.exists(probe) and not os.path.isdir(probe):
        raise FileError(f"{flag} {path}: exists and is not a directory")
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise FileError(f"{flag} {path}: {probe} is not a writable directory")


def one_line(msg: str, limit: int = 300) -> str:
    """An exception's message as one line of at most ``limit`` characters (torch's state-dict errors
    and safetensors' run to many lines)."""
    s = " ".join(part.strip() for part in str(msg).splitlines() if part.strip())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def save_npy(path: str, arr) -> None:
    """``arr`` as a .npy file, written atomically (never a pickle)."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.asarray(arr), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temporary file in the same directory and rename: never half a file."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "is a directory", path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=d)
    except OSError as exc:  # name the target, never the temporary file
        raise type(exc)(exc.errno, exc.strerror, path) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file ordinary permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and exc.filename == tmp:
            raise type(exc)(exc.errno, exc.strerror, path) from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
