"""Engram table files that cannot serve wrong rows (issue #19, item 1).

Each malformed file is built byte by byte here (`struct` + `json`) and the safetensors library itself is the
reference: it must refuse the same file (overlap, gap, trailing bytes), so the checks are not stricter or
looser than the format. Truncation while serving runs in a child process, because without the check the
process dies with SIGBUS.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from memory_service.engram_tables import EngramTableStore, TableFileChanged, TableFileCorrupt
from memory_service.table_file import MappedTableFile
from memory_service.table_writer import write_fp8_table_streamed

REPO = Path(__file__).resolve().parents[2]


def build(path: Path, tensors: dict[str, tuple[str, list[int], tuple[int, int]]], data: bytes,
          metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file from its parts: header {name: (dtype, shape, (begin, end))}, then `data` verbatim."""
    header: dict = {name: {"dtype": dtype, "shape": shape, "data_offsets": list(offsets)}
                    for name, (dtype, shape, offsets) in tensors.items()}
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def library_refuses(path: Path) -> bool:
    try:
        load_file(str(path))
    except Exception:  # noqa: BLE001 - the library raises its own error types
        return True
    return False


ROWS, DIM = 64, 32  # an fp8 table [64, 32] (2048 bytes) and its scales [64, 1] (64 bytes)
TABLE, SCALES = ROWS * DIM, ROWS


def table_bytes(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 0x7E, TABLE, dtype=np.uint8)  # e4m3 codes, no NaN (0x7f / 0xff)
    scales = rng.integers(120, 134, SCALES, dtype=np.uint8)  # e8m0 codes near 2**0
    return data.tobytes() + scales.tobytes()


def layout(table=(0, TABLE), scales=(TABLE, TABLE + SCALES)):
    return {"engram.1.table": ("F8_E4M3", [ROWS, DIM], table), "engram.1.scales": ("F8_E8M0", [ROWS, 1], scales)}


def test_the_well_formed_file_is_served_and_the_library_reads_it(tmp_path):
    """Control: the builder makes valid files, so the refusals below are about the defect alone."""
    path = build(tmp_path / "good.safetensors", layout(), table_bytes())
    assert not library_refuses(path)
    store = EngramTableStore(hot_cache_rows=0)
    store.add_model("m", path)
    assert store.lookup("m", 1, torch.tensor([0, 63])).shape == (2, DIM)
    store.close()


@pytest.mark.parametrize("defect, files, message", [
    # the scales claim the last 64 bytes of the table: the store would serve table bytes as scales
    ("overlap", (layout(scales=(TABLE - SCALES, TABLE)), TABLE), r"'engram\.1\.scales'.*overlaps.*'engram\.1\.table'"),
    # the same, with the overlap hidden by a third tensor covering the tail
    ("overlap_covered", ({**layout(scales=(TABLE - SCALES, TABLE)),
                          "engram.2.table": ("F32", [16], (TABLE, TABLE + SCALES))}, TABLE + SCALES), "overlaps"),
    # the table entry dropped from the header: its 2048 bytes belong to nothing
    ("gap", ({"engram.1.scales": ("F8_E8M0", [ROWS, 1], (TABLE, TABLE + SCALES))}, TABLE + SCALES),
     r"data bytes \[0, 2048\) belong to no tensor"),
    # a tensor dropped from the middle
    ("gap_middle", ({"engram.1.table": ("F8_E4M3", [ROWS, DIM], (0, TABLE)),
                     "engram.1.scales": ("F8_E8M0", [ROWS, 1], (TABLE + 64, TABLE + 64 + SCALES))},
                    TABLE + 64 + SCALES), r"data bytes \[2048, 2112\) belong to no tensor"),
    # valid tensors followed by 40 bytes no tensor describes
    ("trailing", (layout(), TABLE + SCALES + 40), "40 trailing bytes after the last tensor"),
])
def test_malformed_offsets_are_refused_at_open_as_the_library_refuses_them(tmp_path, defect, files, message):
    tensors, data_len = files
    data = (table_bytes() * 2)[:data_len]
    path = build(tmp_path / f"{defect}.safetensors", tensors, data)
    assert library_refuses(path), "reference: the safetensors library refuses this file"
    with pytest.raises(ValueError, match=message) as caught:
        MappedTableFile(path)
    assert str(path) in str(caught.value)
    store = EngramTableStore()
    with pytest.raises(ValueError, match=message):
        store.add_model("m", path)
    assert store.models() == []


def test_overlap_would_have_served_wrong_rows(tmp_path):
    """Why overlap matters: a header whose scales alias the table's last rows names real, wrong bytes."""
    raw = table_bytes()
    path = build(tmp_path / "overlap.safetensors", layout(scales=(TABLE - SCALES, TABLE)), raw[:TABLE])
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    aliased = path.read_bytes()[8 + header_len + TABLE - SCALES: 8 + header_len + TABLE]
    assert aliased != raw[TABLE:]  # the "scales" it would serve are table bytes, not the scales
    with pytest.raises(ValueError, match="overlaps"):
        MappedTableFile(path)


CHILD = textwrap.dedent("""
    import os, sys, torch
    from memory_service.engram_tables import EngramTableStore
    path, how = sys.argv[1], sys.argv[2]
    store = EngramTableStore(hot_cache_rows=int(sys.argv[3]))
    store.add_model("m", path)
    ids = torch.arange(0, 64)
    before = store.lookup("m", 1, ids)
    if how == "truncate":
        os.truncate(path, 4096)
    else:  # replace: write a new file and rename it over the served one
        with open(path + ".new", "wb") as handle:
            handle.write(open(path, "rb").read())
        os.replace(path + ".new", path)
    try:
        store.lookup("m", 1, ids)
    except Exception as exc:
        print("REFUSED", type(exc).__name__, exc)
        sys.exit(0)
    print("SERVED")
""")


@pytest.mark.parametrize("how, message", [("truncate", "size 4096 bytes"), ("replace", "replaced by another file")])
@pytest.mark.parametrize("hot_cache_rows", [0, 1024])
def test_a_table_file_changed_while_served_fails_lookups_instead_of_sigbus(tmp_path, how, message, hot_cache_rows):
    rows, dim = 4096, 256  # 1 MiB of table: truncation to 4 KiB leaves almost every row past the end
    rng = np.random.default_rng(0)
    path = tmp_path / "big.safetensors"
    write_fp8_table_streamed(path, 1, rows, dim, [rng.integers(0, 0x7E, (rows, dim), dtype=np.uint8)],
                             [np.full((rows, dim // 32), 127, np.uint8)])
    child = subprocess.run([sys.executable, "-c", CHILD, str(path), how, str(hot_cache_rows)], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, f"child died (signal {-child.returncode} if negative): {child.stderr[-2000:]}"
    assert child.stdout.startswith("REFUSED TableFileChanged"), child.stdout
    assert message in child.stdout and str(path) in child.stdout


def test_truncation_is_seen_by_the_mapped_file_itself(tmp_path):
    path = build(tmp_path / "t.safetensors", layout(), table_bytes())
    with MappedTableFile(path) as mapped:
        mapped.tensor("engram.1.table", rows=(0, 4))
        os.truncate(path, 100)
        with pytest.raises(TableFileChanged, match="changed while served"):
            mapped.tensor("engram.1.table", rows=(4, 8))


def test_writer_checksum_catches_one_flipped_data_byte(tmp_path):
    rows, dim = 300, 64
    rng = np.random.default_rng(1)
    data = rng.integers(0, 0x7E, (rows, dim), dtype=np.uint8)
    scales = rng.integers(120, 134, (rows, dim // 32), dtype=np.uint8)
    path = tmp_path / "sum.safetensors"
    write_fp8_table_streamed(path, 2, rows, dim, np.array_split(data, 7), np.array_split(scales, 3))
    raw = path.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    # reference: the library reads the file and the recorded digest is hashlib's over the data region
    with safe_open(str(path), framework="pt") as handle:
        recorded = handle.metadata()["engram.sha256"]
        assert np.array_equal(handle.get_tensor("engram.2.table").view(torch.uint8).numpy(), data)
    assert recorded == hashlib.sha256(raw[8 + header_len:]).hexdigest()
    with MappedTableFile(path) as mapped:
        assert mapped.verify() is True
    store = EngramTableStore()
    store.add_model("m", path, verify=True)
    assert store.verify("m") is True

    flipped = bytearray(raw)
    flipped[8 + header_len + 12345] ^= 0x01  # one bit of one fp8 value
    path.write_bytes(bytes(flipped))  # in place: same size, same inode, so still served
    assert not library_refuses(path)  # the format alone cannot see it
    with MappedTableFile(path) as mapped:
        with pytest.raises(TableFileCorrupt, match=f"{path}: checksum mismatch"):
            mapped.verify()
    with pytest.raises(TableFileCorrupt, match="checksum mismatch"):
        store.verify("m")
    with pytest.raises(ValueError, match="checksum mismatch"):
        EngramTableStore().add_model("again", path, verify=True)
    store.close()


def test_verify_command_exits_nonzero_with_one_line_on_a_bad_file(tmp_path):
    rows, dim = 40, 32
    good = tmp_path / "good.safetensors"
    write_fp8_table_streamed(good, 1, rows, dim, [np.zeros((rows, dim), np.uint8)],
                             [np.full((rows, 1), 127, np.uint8)])
    unsummed = tmp_path / "unsummed.safetensors"
    write_fp8_table_streamed(unsummed, 1, rows, dim, [np.zeros((rows, dim), np.uint8)],
                             [np.full((rows, 1), 127, np.uint8)], checksum=False)
    flipped = tmp_path / "flipped.safetensors"
    raw = bytearray(good.read_bytes())
    raw[-1] ^= 0x80
    flipped.write_bytes(bytes(raw))
    trailing = tmp_path / "trailing.safetensors"
    trailing.write_bytes(good.read_bytes() + b"\0" * 8)

    def verify(path: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "memory_service.verify", str(path)], cwd=REPO,
                              capture_output=True, text=True, timeout=120)

    ok = verify(good)
    assert ok.returncode == 0 and ok.stdout.startswith("ok: ") and "sha256" in ok.stdout
    plain = verify(unsummed)
    assert plain.returncode == 0 and "no checksum" in plain.stdout
    for bad, why in ((flipped, "checksum mismatch"), (trailing, "8 trailing bytes")):
        result = verify(bad)
        assert result.returncode == 1, result
        assert result.stdout.count("\n") == 1 and result.stdout.startswith(f"bad: {bad}") and why in result.stdout
