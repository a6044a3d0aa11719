"""Training logs: a CSV of every logged step (+ TensorBoard when installed) and a PNG of the curves."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

from meshforge.io import atomic_path, atomic_write_text
from meshforge.runtime import has_module


def read_csv(path: Path) -> list[dict[str, float]]:
    """Rows of a metrics CSV as floats (empty cells left out)."""
    with open(path, newline="") as fh:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]


class MetricsLog:
    """Rows of ``{"step": n, name: value, ...}`` kept in memory and rewritten atomically as one CSV.

    Rewriting (rather than appending) keeps the file whole at every moment and lets a resumed run
    drop the rows logged after its checkpoint (rows up to ``keep_until_step`` are kept; 0 starts
    afresh), so the CSV is the curve of one uninterrupted run.
    Columns are the union of all keys, in first-seen order (validation columns appear at the
    first evaluation). Writes are throttled to one per ``flush_seconds``; :meth:`close` writes.
    """

    def __init__(self, path: Path, keep_until_step: int = 0, flush_seconds: float = 5.0) -> None:
        self.path = Path(path)
        self.flush_seconds = flush_seconds
        self.rows: list[dict[str, float]] = []
        if keep_until_step > 0 and self.path.is_file():
            self.rows = [r for r in read_csv(self.path) if r["step"] <= keep_until_step]
        self._last_flush = 0.0
        self._tb = None
        if has_module("tensorboard"):
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=keep_until_step)

    def log(self, step: int, values: dict[str, Any]) -> None:
        self.rows.append({"step": step, **{k: float(v) for k, v in values.items()}})
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, float(value), step)
        if time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        columns: dict[str, None] = {}
        for row in self.rows:
            columns.update(dict.fromkeys(row))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: (int(v) if k == "step" else repr(v)) for k, v in row.items()})
        atomic_write_text(self.path, buf.getvalue())
        if self._tb is not None:
            self._tb.flush()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()
        if self._tb is not None:
            self._tb.close()


def plot_curves(csv_path: Path, png_path: Path) -> None:
    """Loss (train and validation) and accuracy columns against the step, as a PNG (headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_csv(Path(csv_path))
    columns = list(dict.fromkeys(k for row in rows for k in row))
    panels = [("loss", [c for c in columns if c.endswith("loss")])]
    accuracy = [c for c in columns if "acc" in c]
    if accuracy:
        panels.append(("accuracy", accuracy))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (title, names) in zip(axes[0], panels):
        for name in names:
            points = [(r["step"], r[name]) for r in rows if name in r]
            ax.plot(*zip(*points), label=name, marker="o" if name.startswith("val") else None, markersize=3)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    losses = [r[c] for c in panels[0][1] for r in rows if c in r]
    if losses and min(losses) > 0 and max(losses) > 10 * min(losses):  # long runs span decades
        axes[0][0].set_yscale("log")
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
