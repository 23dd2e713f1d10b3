"""Writing published files below an output: one put that records itself, and the HF weight index."""

from __future__ import annotations

import hashlib
import json

from workers.results import OutputFile
from workers.tensor_io import INDEX_NAME
from workers.storage import Location


def put_file(output: Location, relative: str, data: bytes) -> OutputFile:
    """Write ``data`` at ``relative`` below the output (atomically); returns its manifest entry."""
    output.put(relative, data)
    return OutputFile(name=relative, size=len(data), sha256=hashlib.sha256(data).hexdigest())


def write_index(output: Location, rows: list[dict], *, directory: str = "", index_name: str = INDEX_NAME) -> OutputFile:
    """Write the HF index of the tensor-table rows whose file lies in ``directory`` (names relative to it)."""
    prefix = f"{directory}/" if directory else ""
    mine = sorted((r for r in rows if r["file"].startswith(prefix) and "/" not in r["file"][len(prefix):]),
                  key=lambda r: r["name"])
    index = {"metadata": {"total_size": sum(r["nbytes"] for r in mine)},
             "weight_map": {r["name"]: r["file"][len(prefix):] for r in mine}}
    return put_file(output, prefix + index_name, json.dumps(index, indent=2).encode())


def tensor_rows(file_name: str, tensors, method: str) -> list[dict]:
    """Tensor-table rows of one written file (``method``: what made them)."""
    return [{"name": t.name, "file": file_name, "dtype": t.dtype, "shape": list(t.shape), "offset": t.offset,
             "nbytes": t.nbytes, "sha256": t.sha256, "method": method} for t in tensors]
