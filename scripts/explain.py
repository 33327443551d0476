r"""What did a trained run learn from the spectrum? Input importance and DEFLECT's deflection.

    python scripts/explain.py work_dirs/<run>                 # its test split
    python scripts/explain.py work_dirs/<run> --split val
    python scripts/explain.py work_dirs/multirun/<time>/00*_deflect_*   # several seeds: spread

For each run (``deflect.engine.explain``): the drop of the test mIoU when each band, and for
DEFLECT each spectral index, raw band feature and pixel-set statistic of the untangled patch
embedding, is replaced by its training mean; and per adapted block the angle between the
untangled and the frozen attention updates, their norm ratio, the update added relative to the
token, and the share of the attention logits made by the spectral stream. Written to
``<run>/diagnostics/`` (``importance.csv``, ``importance.png``, ``explain.json``,
``deflection.png``) and appended to ``<run>/train.log``. With several runs (seeds of one
configuration), each gets its own files and ``importance.png`` shows the spread over them.
``run.py ... diagnostics=true`` does the same at the end of training.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> list[dict]:
    """Explain every run given; returns their reports."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="finished run folders")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    from deflect.engine.explain import explain_run, write_report

    reports = [explain_run(run, args.split, args.device) for run in args.runs]
    if len(reports) > 1:  # the seed spread of every input, drawn on each run's picture
        spread: dict[str, list[float]] = {}
        for report in reports:
            for row in report["importance"]:  # a band and its UPE feature share a name
                spread.setdefault(f"{row['kind']}:{row['input']}", []).append(row["drop"])
        for run, report in zip(args.runs, reports):
            write_report(run, report, spread)
    return reports


if __name__ == "__main__":
    main()
