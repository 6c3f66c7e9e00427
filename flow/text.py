"""Real text for calibration and evaluation, offline.

By default Jane Austen's novels from Debian's ``r-cran-janeaustenr`` (public domain text, MIT
package): the ``.deb`` is fetched with ``apt-get download`` (no R needed), unpacked with
``dpkg-deb -x``, and the character vectors are read from R's lazy-load database
(``data/Rdata.rdx`` + ``Rdata.rdb``) by the small reader below, then cached as plain text.

Calibration and evaluation never overlap: calibration comes from the first half of *Pride and
Prejudice*, evaluation from its second half (``held-out``) and from *Emma*.  A user text
(``--text FILE``) is split the same way: first half calibration, second half evaluation.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import os
import pathlib
import shutil
import struct
import subprocess
import tempfile
import zlib

import torch
from flexcim.flow.model import cache_dir

from flexcim.errors import FlexCimError
from flexcim.fileio import atomic_dir, file_lock

log = logging.getLogger("flexcim.flow")

AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_BOOKS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma",
                "northangerabbey", "persuasion")


# ---------------------------------------------------------------------------------------------
# A minimal reader for R's serialization format (XDR, versions 2 and 3), enough for lazy-load
# databases of plain data: vectors, strings, pairlists, symbols, attributes.  See R Internals,
# "Serialization Formats".

_NILVALUE, _REFSXP = 254, 255
_SPECIAL = {254, 253, 252, 251, 250, 242, 241}  # nil, environments, missing arg: no payload
_PAIRLIKE = {2, 3, 5, 6, 17, 239, 240}  # LISTSXP, CLOSXP, PROMSXP, LANGSXP, DOTSXP, ATTR*


class _RReader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.refs: list = []

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise FlexCimError("R data ends early (truncated or corrupt)")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def _length(self) -> int:
        n = self.int()
        if n == -1:
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def read(self):
        if self._take(2) != b"X\n":
            raise FlexCimError("R data is not in XDR serialization format")
        version = self.int()
        self.int()  # writer's R version
        self.int()  # minimal reader version
        if version == 3:
            self._take(self.int())  # native encoding name
        elif version != 2:
            raise FlexCimError(f"unsupported R serialization version {version}")
        return self.item()

    def item(self):
        flags = self.int()
        kind = flags & 0xFF
        has_attr, has_tag = flags & (1 << 9), flags & (1 << 10)
        if kind == _REFSXP:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind in _SPECIAL:
            return None
        if kind == 1:  # SYMSXP
            name = self.item()
            self.refs.append(name)
            return name
        if kind in (247, 249, 248):  # persistent/namespace/package: a STRSXP of names
            self.int()
            names = [self.item() for _ in range(self.int())]
            self.refs.append(names)
            return names
        if kind in _PAIRLIKE:
            out = {}
            items = []
            while True:
                if has_attr:
                    self.item()
                tag = self.item() if has_tag else None
                value = self.item()
                items.append((tag, value))
                flags = self.int()
                kind = flags & 0xFF
                has_attr, has_tag = flags & (1 << 9), flags & (1 << 10)
                if kind == _NILVALUE:
                    break
                if kind not in _PAIRLIKE:
                    self.pos -= 4
                    items.append((None, self.item()))
                    break
            if all(tag is not None for tag, _ in items):
                out.update(items)
                return out
            return [value for _, value in items]
        if kind == 9:  # CHARSXP
            n = self.int()
            return None if n == -1 else self._take(n).decode("utf-8", errors="replace")
        if kind in (10, 13):  # LGLSXP, INTSXP
            n = self._length()
            value = list(struct.unpack(f">{n}i", self._take(4 * n)))
        elif kind == 14:  # REALSXP
            n = self._length()
            value = list(struct.unpack(f">{n}d", self._take(8 * n)))
        elif kind in (16, 19, 20):  # STRSXP, VECSXP, EXPRSXP
            value = [self.item() for _ in range(self._length())]
        else:
            raise FlexCimError(f"unsupported R object type {kind} in R data")
        if has_attr:
            attrs = self.item()
            if isinstance(attrs, dict) and kind == 19 and "names" in attrs:
                value = dict(zip(attrs["names"], value, strict=True))
        return value


def read_rds_bytes(data: bytes):
    """Unserialize one R object (uncompressed XDR bytes)."""
    return _RReader(data).read()


def _inflate_rdb(blob: bytes) -> bytes:
    """One lazy-load record: 4-byte big-endian length, then zlib (or typed) compressed data."""
    if len(blob) < 5:
        raise FlexCimError("R lazy-load record is truncated")
    try:
        if blob[4:5] in (b"Z", b"2", b"X", b"0"):  # typed records (compress = 2 or 3)
            kind, payload = blob[4:5], blob[5:]
            if kind == b"0":
                return payload
            if kind == b"Z":
                return zlib.decompress(payload)
            if kind == b"2":
                import bz2

                return bz2.decompress(payload)
            import lzma

            return lzma.decompress(payload)
        return zlib.decompress(blob[4:])
    except (zlib.error, OSError, ValueError) as exc:
        raise FlexCimError(f"R lazy-load record is corrupt: {exc}") from None


def read_lazyload(rdx: str | os.PathLike) -> dict[str, object]:
    """Every variable of an R lazy-load database ``X.rdx`` (with ``X.rdb`` beside it)."""
    rdx = pathlib.Path(rdx)
    rdb = rdx.with_suffix(".rdb")
    try:
        raw = rdx.read_bytes()
        index_bytes = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else _inflate_rdb(raw)
        index = read_rds_bytes(index_bytes)
        data = rdb.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise FlexCimError(f"cannot read R lazy-load database {str(rdx)!r}: {exc}") from None
    if not isinstance(index, dict) or not isinstance(index.get("variables"), dict):
        raise FlexCimError(f"{str(rdx)!r} is not an R lazy-load index")
    out = {}
    for name, (offset, length) in index["variables"].items():
        out[name] = read_rds_bytes(_inflate_rdb(data[int(offset) : int(offset) + int(length)]))
    return out


# ---------------------------------------------------------------------------------------------


def _fetch_austen(target: pathlib.Path) -> None:
    """Download the Debian package, extract the six novels and write them as ``*.txt``."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise FlexCimError(
            f"the default text needs apt-get and dpkg-deb (Debian package {AUSTEN_PACKAGE}); "
            "pass --text FILE instead"
        )
    log.info("fetching Jane Austen's novels (Debian package %s, 1.6 MB, once)", AUSTEN_PACKAGE)
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            ["apt-get", "download", AUSTEN_PACKAGE], cwd=tmp, capture_output=True, text=True
        )
        debs = list(pathlib.Path(tmp).glob(f"{AUSTEN_PACKAGE}_*.deb"))
        if result.returncode or not debs:
            message = (result.stderr.strip().splitlines() or ["no .deb written"])[-1]
            raise FlexCimError(
                f"apt-get download {AUSTEN_PACKAGE} failed ({message}); pass --text FILE instead"
            )
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), f"{tmp}/x"], check=True)
        rdx = next(pathlib.Path(tmp, "x").rglob("janeaustenr/data/Rdata.rdx"))
        books = read_lazyload(rdx)
    target.parent.mkdir(parents=True, exist_ok=True)
    # All six books appear at once (the folder is renamed into place), or none do.
    with atomic_dir(target) as tmp:
        for name in AUSTEN_BOOKS:
            lines = books.get(name)
            if not isinstance(lines, list):
                raise FlexCimError(f"{AUSTEN_PACKAGE} has no character vector {name!r}")
            (tmp / f"{name}.txt").write_text("\n".join(line or "" for line in lines) + "\n")


def austen(book: str) -> str:
    """The text of one of :data:`AUSTEN_BOOKS`, cached under :func:`cache_dir`."""
    if book not in AUSTEN_BOOKS:
        raise FlexCimError(f"unknown Austen book {book!r}; expected one of {AUSTEN_BOOKS}")
    target = cache_dir() / "text" / "austen"
    path = target / f"{book}.txt"
    def complete() -> bool:
        return all((target / f"{name}.txt").is_file() for name in AUSTEN_BOOKS)

    if not complete():
        with file_lock(target.with_name(target.name + ".lock")):
            if not complete():  # a concurrent run may have fetched it meanwhile
                _fetch_austen(target)
    return path.read_text()


def read_text_file(path: str | os.PathLike) -> str:
    """A user's UTF-8 text file; missing, binary or too-short files are rejected in one line."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FlexCimError(f"text file {str(path)!r} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FlexCimError(f"text file {str(path)!r} is not UTF-8 text ({exc.reason})") from None
    if "\x00" in text:
        raise FlexCimError(f"text file {str(path)!r} is binary, not text")
    if len(text.split()) < 200:
        raise FlexCimError(f"text file {str(path)!r} is too short (fewer than 200 words)")
    return text


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Disjoint calibration and evaluation texts.

    Members
    -------
    calibration : str
    evaluation : dict of str to str
        Named evaluation texts (``held-out``, ``emma`` for the default corpus).
    source : str
    """

    calibration: str
    evaluation: dict[str, str]
    source: str


def _halves(text: str) -> tuple[str, str]:
    # Cut at a line break so no word or sentence spans both halves.
    cut = text.find("\n", len(text) // 2)
    cut = len(text) // 2 if cut < 0 else cut
    return text[:cut], text[cut:]


def load_corpus(text_file: str | os.PathLike | None = None) -> Corpus:
    """The default Austen corpus, or a user's text split into disjoint halves."""
    if text_file is not None:
        first, second = _halves(read_text_file(text_file))
        return Corpus(first, {"held-out": second}, str(text_file))
    first, second = _halves(austen("prideprejudice"))
    return Corpus(first, {"held-out": second, "emma": austen("emma")},
                  "Jane Austen (r-cran-janeaustenr)")


def token_windows(tokenizer, text: str, *, seq_len: int, count: int | None = None,
                  seed: int = 0) -> torch.Tensor:
    """Non-overlapping ``seq_len``-token windows of ``text`` as ``int64 [count, seq_len]``.

    ``count`` windows are drawn without replacement with a seeded ``torch.Generator`` (and
    returned in text order); ``None`` takes every whole window.  No BOS token is added: each
    window is a plain slice of the running text.
    """
    if seq_len < 2:
        raise FlexCimError(f"window length must be at least 2 tokens, not {seq_len}")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    available = ids.numel() // seq_len
    if count is None:
        count = available
    if count < 1 or count > available:
        raise FlexCimError(
            f"text has {ids.numel()} tokens = {available} windows of {seq_len}; "
            f"cannot take {count}"
        )
    windows = ids[: available * seq_len].view(available, seq_len)
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(available, generator=generator)[:count].sort().values
    return windows[pick].clone()
