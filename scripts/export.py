r"""Export a finished run to one ONNX file that ONNX Runtime runs without PyTorch.

    python scripts/export.py work_dirs/<run>            # <run>/export/model.onnx + README.md
    python scripts/export.py work_dirs/<run> --out deploy/kilns.onnx

The file takes the raw image as stored (the run's bands in order, float32) and holds the
no-data handling, the normalisation, the model with its adapter merged into the weights where
the method allows (DEFLECT's spectral stream stays in the graph), and the task's outputs:
class logits at the input's size (segmentation) or probabilities and logits (classification).
Batch, height and width are free (multiples of the patch size). Before the file is kept, ONNX
Runtime's outputs are checked against PyTorch's at the trained size and two others. The band
manifest, classes, task, method and framework version are in the file's metadata;
``export/README.md`` beside it says what it takes and gives, with an onnxruntime example.
Needs the export extra: ``pip install -e '.[export]'`` (``make setup`` installs it).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

log = logging.getLogger("export")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, export the run, print where the file is and what was checked."""
    from deflect.engine.logging import setup_logging
    from deflect.export import ExportError, export_run

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path, help="the finished run folder")
    parser.add_argument(
        "--out", type=Path, default=None, help="the ONNX file (default <run>/export/model.onnx)"
    )
    parser.add_argument(
        "--allow-unfinished", action="store_true",
        help="export a run that has not finished (its best checkpoint so far)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    setup_logging(None, True)
    try:
        result = export_run(args.run_dir, args.out, args.allow_unfinished)
    except (ExportError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sizes = ", ".join(f"{h}x{w}" for h, w in result.checked_sizes)
    print(f"wrote {result.path} ({result.size_bytes / 1e6:.1f} MB) in {result.seconds:.1f} s")
    print(f"adapter: {result.merged}")
    print(f"ONNX Runtime = PyTorch within {result.max_difference:.2g} at {sizes}")
    print(f"how to run it: {result.path.with_name('README.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
