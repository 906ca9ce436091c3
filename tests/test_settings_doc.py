"""docs/settings.md lists every setting the runtime reads, and names none it does not (it drifted before: eight
settings were in no document)."""

from __future__ import annotations

import re
from pathlib import Path

from runtime.settings import Settings

DOC = Path(__file__).resolve().parents[1] / "docs" / "settings.md"
READ_ELSEWHERE = {"ENGRAM_URL", "ENGRAM_API_KEY", "ENGRAM_KERNELS", "ENGRAM_CPU_GEMM", "ENGRAM_KERNEL_CACHE"}


def test_every_setting_has_a_row_and_every_row_is_a_setting():
    rows = set(re.findall(r"^\| `(ENGRAM_[A-Z_]+)` \|", DOC.read_text(), re.M))
    fields = {f"ENGRAM_{name.upper()}" for name in Settings.model_fields}
    assert fields - rows == set(), "settings without a row in docs/settings.md"
    assert rows - fields - READ_ELSEWHERE == set(), "rows for variables nothing reads"
    sources = [path.read_text() for package in ("runtime", "engram_kernels", "model_worker")
               for path in (DOC.parents[1] / package).rglob("*.py")]
    for name in READ_ELSEWHERE:  # each is read where the doc says (the SDK and CLI, the kernels)
        assert any(name in source for source in sources), name
