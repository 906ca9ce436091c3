"""Must-show 2: a table file larger than a configured memory budget is served through the memory map.

RSS counts file pages mapped into the process (RssFile) as well as anonymous memory, so a map that is
only ever faulted in would grow RSS to the table size even though the pages are reclaimable page cache.
The store's `resident_budget_bytes` drops mapped pages (madvise) once that many bytes may have been
faulted in. A child process looks up every row of a 1 GiB fp8 table with a 128 MiB budget and reports
its RssFile after every batch and its peak RSS (VmHWM, reset after warm-up); a second, unbudgeted store
shows the measurement does see mapped pages. Every row is checked against a bit-level decoder.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from memory_service.table_writer import write_fp8_table_streamed
from tests.memory_service.test_engram_tables import decode_e4m3

MiB = 2**20
HEAD_DIM = 256
ROWS = 4_100_000  # (256 + 8) bytes a row -> 1.01 GiB
PATTERN_ROWS = 251  # row r holds pattern[r % 251] with e8m0 scale byte 120 + r % 13
BUDGET = 128 * MiB
BATCH = 8192
REPO = Path(__file__).resolve().parents[2]


def pattern() -> np.ndarray:
    """[251, 256] e4m3 bytes, NaN codes (0x7f, 0xff) excluded."""
    raw = np.random.default_rng(0).integers(0, 256, (PATTERN_ROWS, HEAD_DIM), dtype=np.uint8)
    return np.where((raw & 0x7F) == 0x7F, raw ^ 0x01, raw).astype(np.uint8)


def write_table_file(path: Path) -> None:
    """A safetensors file written chunk by chunk (the writer never holds the table)."""
    rows_pattern = pattern()
    data = (rows_pattern[np.arange(lo, min(lo + 65536, ROWS)) % PATTERN_ROWS] for lo in range(0, ROWS, 65536))
    scale_rows = (np.arange(lo, min(lo + (1 << 20), ROWS)) for lo in range(0, ROWS, 1 << 20))
    scales = (np.repeat((120 + rows % 13).astype(np.uint8)[:, None], HEAD_DIM // 32, axis=1) for rows in scale_rows)
    write_fp8_table_streamed(path, 1, ROWS, HEAD_DIM, data, scales)


CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from memory_service.engram_tables import EngramTableStore
    from tests.memory_service.test_engram_memory_budget import BATCH, BUDGET, PATTERN_ROWS, ROWS, pattern
    from tests.memory_service.test_engram_tables import decode_e4m3

    def status():
        fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return {k: int(fields[k].split()[0]) * 1024 for k in ("RssFile", "RssAnon", "VmRSS", "VmHWM")}

    path = sys.argv[1]
    values = torch.from_numpy(decode_e4m3(pattern()).astype(np.float32))  # [251, 256]
    store = EngramTableStore(hot_cache_rows=0, resident_budget_bytes=BUDGET)
    store.add_model("big", path)
    store.lookup("big", 1, torch.arange(BATCH))  # warm-up: allocator pools, code pages
    store._charge(BUDGET + 1)  # start from released pages
    base = status()
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    max_file, checked = 0, 0
    for lo in range(0, ROWS, BATCH):
        ids = torch.arange(lo, min(lo + BATCH, ROWS))
        rows = store.lookup("big", 1, ids)
        want = values[ids % PATTERN_ROWS] * torch.exp2((120 + ids % 13).float() - 127)[:, None]
        checked += int(torch.equal(rows, want)) * ids.numel()
        max_file = max(max_file, status()["RssFile"] - base["RssFile"])
    end = status()
    control = EngramTableStore(hot_cache_rows=0)
    control.add_model("big", path)
    control_base = status()["RssFile"]
    control_rows = 256 * 2**20 // 264
    for lo in range(0, control_rows, BATCH):
        control.lookup("big", 1, torch.arange(lo, min(lo + BATCH, control_rows)))
    print(json.dumps({"checked": checked, "max_file_delta": max_file, "peak_delta": end["VmHWM"] - base["VmRSS"],
                      "releases": store.residency_stats()["releases"],
                      "control_file_delta": status()["RssFile"] - control_base,
                      "control_touched": control_rows * 264}))
""")


def test_table_larger_than_budget_serves_every_row_with_rss_under_budget(tmp_path):
    path = tmp_path / "big_engram_tables.safetensors"
    try:
        write_table_file(path)
        file_bytes = path.stat().st_size
        assert file_bytes > 8 * BUDGET
        child = subprocess.run([sys.executable, "-c", CHILD, str(path)], cwd=REPO, capture_output=True, text=True,
                               timeout=120)
        assert child.returncode == 0, child.stderr[-3000:]
        report = json.loads(child.stdout.strip().splitlines()[-1])
    finally:
        path.unlink(missing_ok=True)
    assert report["checked"] == ROWS  # every row reachable, and exact
    assert report["releases"] >= file_bytes // BUDGET - 1
    assert report["max_file_delta"] <= BUDGET + 16 * MiB, report  # mapped table pages after each batch
    assert report["peak_delta"] <= BUDGET + 96 * MiB, report  # whole-process peak, anonymous buffers included
    assert report["peak_delta"] < file_bytes / 4
    # control: without a budget the mapped pages stay resident, and RssFile sees them
    assert report["control_file_delta"] >= 0.9 * report["control_touched"], report


def test_bit_decoder_matches_torch_e4m3():
    """The decoder the child checks rows with agrees with torch's float8_e4m3fn on all 254 finite codes."""
    codes = np.array([c for c in range(256) if c & 0x7F != 0x7F], dtype=np.uint8)
    want = __import__("torch").from_numpy(codes).view(__import__("torch").float8_e4m3fn).double().numpy()
    assert np.array_equal(decode_e4m3(codes), want)
