"""What a classification evaluation logs: the per-class table."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def classification_table(metrics: dict, title: str, multi_label: bool = False) -> str:
    """The per-class table of an image-level evaluation and its means, as text."""
    table = Table(title=title)
    columns = ["class", "F1", "Precision", "Recall", *(["AP"] if multi_label else []), "samples"]
    for column in columns:
        table.add_column(column, justify="left" if column == "class" else "right")

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.2f}"

    for name, values in metrics["per_class"].items():
        table.add_row(
            name, fmt(values["F1"]), fmt(values["Precision"]), fmt(values["Recall"]),
            *([fmt(values["AP"])] if multi_label else []), str(values["support"]),
        )  # fmt: skip
    table.add_section()
    table.add_row(
        "mean", fmt(metrics["mF1"]), fmt(metrics["mPrecision"]), fmt(metrics["mRecall"]),
        *([fmt(metrics["mAP"])] if multi_label else []), str(metrics["samples"]),
    )  # fmt: skip
    console = Console(width=100, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(table)
    text = console.export_text()
    if multi_label:
        text += (f"micro F1: {fmt(metrics['microF1'])}, mAP: {fmt(metrics['mAP'])} (labels at "
                 f"probability >= {metrics['threshold']:g})")  # fmt: skip
    else:
        text += f"overall accuracy (OA): {fmt(metrics['OA'])}"
    if metrics["absent_classes"]:
        text += f"; {metrics['absent_classes']} class(es) absent from this split, left out of means"
    return text
