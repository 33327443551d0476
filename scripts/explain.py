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

Only finished runs (``metrics.json``), unless ``--allow-unfinished``; never a folder a training
run holds (its lock). ``explain.json`` records the checkpoint explained (SHA-256, epoch); once
the run's ``best.pt`` changes, the ablation table treats the diagnostics as stale.
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
    parser.add_argument("--allow-unfinished", action="store_true",
                        help="also explain runs without metrics.json (their best checkpoint so "
                        "far; said loudly, and marked stale once best.pt changes)")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    from deflect.engine.explain import check_explainable, explain_run, write_report
    from deflect.engine.workdir import RunFolderBusy, RunLock

    locks, checked = [], []
    try:
        try:  # every folder claimed and checked before anything is computed or written
            for run in args.runs:
                if not run.is_dir():
                    raise FileNotFoundError(f"no run folder {run}")
                locks.append(RunLock(run).acquire())
                checked.append(check_explainable(run, args.allow_unfinished))
        except (RunFolderBusy, RuntimeError, FileNotFoundError) as err:
            raise SystemExit(f"error: {err}") from None
        reports = [explain_run(run, args.split, args.device, lock=False, checked=record)
                   for run, record in zip(args.runs, checked)]  # fmt: skip
        if len(reports) > 1:  # the seed spread of every input, drawn on each run's picture
            spread: dict[str, list[float]] = {}
            for report in reports:
                for row in report["importance"]:  # a band and its UPE feature share a name
                    spread.setdefault(f"{row['kind']}:{row['input']}", []).append(row["drop"])
            for run, report in zip(args.runs, reports):
                write_report(run, report, spread)
    finally:
        for lock in locks:
            lock.release()
    return reports


if __name__ == "__main__":
    main()
