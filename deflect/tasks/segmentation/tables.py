"""What a segmentation evaluation logs: TensorBoard scalars and the per-class table."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def metric_scalars(prefix: str, metrics: dict) -> dict[str, float]:
    """TensorBoard tags for the means and each class's IoU."""
    out = {f"{prefix}/{k}": metrics[k] for k in ("mIoU", "mF1", "mPrecision", "mRecall", "OA")}
    for name, values in metrics["per_class"].items():
        out[f"{prefix}_IoU/{name}"] = values["IoU"]
    return out


def metrics_table(metrics: dict, title: str) -> str:
    """The per-class table and the means, as text (also written to the log)."""
    table = Table(title=title)
    for column in ("class", "IoU", "F1", "Precision", "Recall", "pixels"):
        table.add_column(column, justify="left" if column == "class" else "right")

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.2f}"

    for name, values in metrics["per_class"].items():
        table.add_row(
            name,
            fmt(values["IoU"]),
            fmt(values["F1"]),
            fmt(values["Precision"]),
            fmt(values["Recall"]),
            str(values["support"]),
        )
    table.add_section()
    table.add_row(
        "mean",
        fmt(metrics["mIoU"]),
        fmt(metrics["mF1"]),
        fmt(metrics["mPrecision"]),
        fmt(metrics["mRecall"]),
        str(metrics["pixels"]),
    )
    console = Console(width=100, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(table)
    text = console.export_text()
    text += f"overall accuracy (OA): {fmt(metrics['OA'])}"
    if metrics["absent_classes"]:
        text += f"; {metrics['absent_classes']} class(es) absent from this split, left out of means"
    return text
