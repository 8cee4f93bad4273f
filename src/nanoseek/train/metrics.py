"""Run metrics: metrics.jsonl (one JSON object per line, each with its "step"), plus
TensorBoard events when tensorboard is installed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nanoseek.checkpoint import atomic_write_text

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """metrics.jsonl (one JSON object per line), plus TensorBoard events when tensorboard is
    installed. Disabled on ranks other than 0."""

    def __init__(self, out_dir: Path, enabled: bool = True, tensorboard: bool = True):
        self.path = Path(out_dir) / METRICS_FILE
        self.enabled = enabled
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key == "step":
                    continue
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(key, value, step)
                elif isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
                    for i, v in enumerate(value):
                        self.tb.add_scalar(f"{key}/{i}", v, step)
                elif isinstance(value, str):
                    self.tb.add_text(key, value, step)

    def truncate_after(self, step: int) -> None:
        """Drop records with a step > `step` (a resumed run rewrites what came after its checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [json.dumps(r) for r in parse_records(self.path.read_text()) if r["step"] <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))  # a crash mid-write keeps the old file

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (the run directory or the file itself), in order."""
    path = Path(path)
    return parse_records((path / METRICS_FILE if path.is_dir() else path).read_text())


def parse_records(text: str) -> list[dict[str, Any]]:
    """metrics.jsonl's records. A last line that does not parse is dropped: a run killed in the
    middle of a write leaves one (its resume truncates the file back to its checkpoint)."""
    lines = [line for line in text.splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
    return records
