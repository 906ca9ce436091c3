"""Check an Engram table file: `python -m memory_service.verify PATH [PATH ...]` (a table file or a checkpoint
directory holding engram_tables.safetensors).

Opens each file as the memory service would (header, offsets covering the data region exactly once, the
Engram tensor names, dtypes and shapes) and, when the file records a checksum, recomputes it over the data.
Prints one line per file; exits 0 if every file is good, 1 if any is bad (the line says why).
"""

from __future__ import annotations

import argparse
import sys

from memory_service.engram_tables import _layer_entries, table_file_path
from memory_service.table_file import MappedTableFile, TableFileChanged


def verify_file(path: str) -> str:
    """'ok: ...' for a good file; raises (ValueError, OSError, TableFileChanged) naming the problem otherwise."""
    file_path = table_file_path(path)
    with MappedTableFile(file_path) as file:
        layers = _layer_entries(file)
        checked = file.verify()
    how = "sha256 of the data matches the header" if checked else "no checksum recorded: structure checked only"
    return f"ok: {file_path}: {len(layers)} Engram layer(s), {file.size} bytes; {how}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m memory_service.verify", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", metavar="PATH", help="table file or checkpoint directory")
    args = parser.parse_args(argv)
    status = 0
    for path in args.paths:
        try:
            print(verify_file(path))
        except (ValueError, OSError, TableFileChanged) as exc:
            print(f"bad: {' '.join(str(exc).split())}")
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
