import gzip
import struct
import zlib

import pytest
import torch
from flexcim.flow import text

from flexcim.errors import FlexCimError


def _i(v):
    return struct.pack(">i", v)


def _charsxp(s):
    b = s.encode()
    return _i(9 | (1 << 15)) + _i(len(b)) + b  # gp bit set, as R writes UTF-8 strings


def _strsxp(items):
    return _i(16) + _i(len(items)) + b"".join(_charsxp(s) for s in items)


def _sym(name):
    return _i(1) + _charsxp(name)


def _named_list(named):
    """VECSXP with a names attribute (pairlist tagged `names`)."""
    body = _i(19 | (1 << 9)) + _i(len(named)) + b"".join(v for v in named.values())
    attr = _i(2 | (1 << 10)) + _sym("names") + _strsxp(list(named)) + _i(254)
    return body + attr


def _serialize(obj_bytes, version=3):
    head = b"X\n" + _i(version) + _i(0x040201) + _i(0x030500)
    if version == 3:
        head += _i(5) + b"UTF-8"
    return head + obj_bytes


def test_r_reader_decodes_strings_ints_reals_and_names():
    ints = _i(13) + _i(3) + _i(1) + _i(-2) + _i(7)
    reals = _i(14) + _i(1) + struct.pack(">d", 2.5)
    obj = _named_list({"a": _strsxp(["x", "yz"]), "b": ints, "c": reals})
    for version in (2, 3):
        assert text.read_rds_bytes(_serialize(obj, version)) == {
            "a": ["x", "yz"], "b": [1, -2, 7], "c": [2.5]
        }


def test_r_reader_na_string_and_truncation():
    na = _i(16) + _i(2) + _charsxp("ok") + _i(9) + _i(-1)
    assert text.read_rds_bytes(_serialize(na)) == ["ok", None]
    with pytest.raises(FlexCimError, match="truncated"):
        text.read_rds_bytes(_serialize(na)[:-3])
    with pytest.raises(FlexCimError, match="XDR"):
        text.read_rds_bytes(b"A\n" + _serialize(na)[2:])


def _lazyload(tmp_path, variables):
    rdb = b""
    offsets = {}
    for name, obj in variables.items():
        raw = _serialize(obj)
        record = struct.pack(">I", len(raw)) + zlib.compress(raw)
        offsets[name] = _i(13) + _i(2) + _i(len(rdb)) + _i(len(record))
        rdb += record
    index = _named_list({"variables": _named_list(offsets), "references": _i(19) + _i(0)})
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(_serialize(index)))
    (tmp_path / "Rdata.rdb").write_bytes(rdb)
    return tmp_path / "Rdata.rdx"


def test_lazyload_database_round_trip(tmp_path):
    rdx = _lazyload(tmp_path, {"emma": _strsxp(["EMMA", "", "By Jane Austen"]),
                               "other": _strsxp(["a"])})
    assert text.read_lazyload(rdx) == {"emma": ["EMMA", "", "By Jane Austen"], "other": ["a"]}


def test_lazyload_corrupt_record_is_one_line(tmp_path):
    rdx = _lazyload(tmp_path, {"emma": _strsxp(["EMMA"])})
    data = bytearray((tmp_path / "Rdata.rdb").read_bytes())
    data[8:12] = b"\xff\xff\xff\xff"
    (tmp_path / "Rdata.rdb").write_bytes(bytes(data))
    with pytest.raises(FlexCimError, match="corrupt"):
        text.read_lazyload(rdx)
    (tmp_path / "Rdata.rdx").write_bytes(b"\x1f\x8bnot gzip")
    with pytest.raises(FlexCimError, match="cannot read R lazy-load"):
        text.read_lazyload(rdx)


def test_user_text_errors(tmp_path):
    with pytest.raises(FlexCimError, match="does not exist"):
        text.load_corpus(tmp_path / "missing.txt")
    (tmp_path / "bin.txt").write_bytes(b"\x00\xff\xfe" * 100)
    with pytest.raises(FlexCimError, match="not UTF-8"):
        text.load_corpus(tmp_path / "bin.txt")
    (tmp_path / "short.txt").write_text("too short\n")
    with pytest.raises(FlexCimError, match="too short"):
        text.load_corpus(tmp_path / "short.txt")


def test_user_text_halves_are_disjoint_and_complete(tmp_path):
    lines = [f"line {i} of the story" for i in range(100)]
    (tmp_path / "t.txt").write_text("\n".join(lines))
    corpus = text.load_corpus(tmp_path / "t.txt")
    held = corpus.evaluation["held-out"]
    assert corpus.calibration + held == "\n".join(lines)
    assert "line 10 " in corpus.calibration and "line 10 " not in held
    assert "line 90 " in held and "line 90 " not in corpus.calibration


def test_token_windows_are_seeded_nonoverlapping_slices(tokenizer):
    g = torch.Generator().manual_seed(0)
    s = "".join(chr(32 + int(i)) for i in torch.randint(0, 90, (1000,), generator=g))
    ids = torch.tensor(tokenizer(s)["input_ids"])
    w = text.token_windows(tokenizer, s, seq_len=10, count=7, seed=3)
    assert w.shape == (7, 10)
    starts = []
    for row in w:  # every window is a whole aligned slice of the text
        matches = [i for i in range(0, 1000, 10) if torch.equal(ids[i : i + 10], row)]
        assert matches
        starts.append(matches[0])
    assert starts == sorted(set(starts))
    assert torch.equal(w, text.token_windows(tokenizer, s, seq_len=10, count=7, seed=3))
    assert not torch.equal(w, text.token_windows(tokenizer, s, seq_len=10, count=7, seed=4))
    assert text.token_windows(tokenizer, s, seq_len=10).shape == (100, 10)
    with pytest.raises(FlexCimError, match="100 windows of 10; cannot take 101"):
        text.token_windows(tokenizer, s, seq_len=10, count=101)
