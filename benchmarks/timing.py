"""What the benchmarks share: timers that wait for the device, markdown tables, JSON lines of the records.

Imported as a sibling module (``python benchmarks/NAME.py`` puts this folder first on sys.path).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch


def synchronize(device: torch.device | str) -> Callable[[], None]:
    """A function that waits for the device's queued work (CUDA); nothing to wait for elsewhere."""
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)


def clock() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this thread): the second leaves out time other processes took the core."""
    return time.perf_counter(), time.thread_time()


def elapsed(start: tuple[float, float], end: tuple[float, float]) -> tuple[float, float]:
    return end[0] - start[0], end[1] - start[1]


def seconds_per_step(step: Callable, inputs: list, device: torch.device, warmup: int = 0) -> float:
    """Run ``step`` on each input; mean wall seconds of the steps after ``warmup``, between device syncs."""
    sync = synchronize(device)
    for item in inputs[:warmup]:
        step(item)
    sync()
    start = time.perf_counter()
    for item in inputs[warmup:]:
        step(item)
    sync()
    return (time.perf_counter() - start) / (len(inputs) - warmup)


def print_table(columns: Sequence[str], rows: Iterable[Sequence], title: str | None = None) -> None:
    """A markdown table, columns padded to their widest cell; ``title`` printed above it."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(name), *(len(row[i]) for row in cells)]) for i, name in enumerate(columns)]
    if title:
        print(f"\n{title}\n")
    print("| " + " | ".join(name.ljust(w) for name, w in zip(columns, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print(
            "| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |", flush=True
        )


def append_jsonl(path: str | Path | None, records: Iterable[dict]) -> None:
    """Append one JSON line per record to ``path`` (nothing without a path)."""
    if path is None:
        return
    with open(path, "a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
