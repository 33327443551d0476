r"""Predict GeoTIFF scenes of any size (or a classification run's chips) with a trained run.

    python scripts/predict.py work_dirs/<run> scene.tif --out predictions/
    python scripts/predict.py work_dirs/<run> scenes/ --out predictions/ --probabilities \
        --device cuda --precision bf16 --batch-size 32 --block 2048
    torchrun --nproc_per_node=4 scripts/predict.py work_dirs/<run> scenes/ --out predictions/
    python scripts/predict.py work_dirs/<classification run> chips/ --out table/   # predictions.csv
    python scripts/predict.py --onnx work_dirs/<run>/export/model.onnx scene.tif --out maps/

Writes ``<OUT>/<stem>_pred.tif`` per scene (uint8 class map with a colour table, 255 where
every band is invalid) and with ``--probabilities`` ``<OUT>/<stem>_prob.tif`` (float32 softmax,
one band per class). The result equals the run's evaluation (sliding window over the whole
scene), but the scene is processed in blocks of ``--block`` pixels: memory depends on the
block, not on the scene. The scene's bands are matched to the model's by name (its band
descriptions, or ``--bands``). Under torchrun, each rank predicts its share of the scenes. A
regression run writes ``<stem>_pred.tif`` as float32, one band per target, the run's
``task.nodata`` where every band is invalid.

With a classification run, a file no larger than the run's training chips is a chip: all chips
go into one table, ``<OUT>/predictions.csv`` (chip, predicted class, a probability per class),
each classified as evaluation classifies a test image. A larger file is a scene, cut into tiles
of the training chips' size, one output pixel per tile. ``--chips`` or ``--scenes`` decides for
every file instead.

With ``--onnx`` the file written by ``scripts/export.py`` runs in ONNX Runtime (CPU) through the
same tiling, band matching and checks (segmentation runs).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

log = logging.getLogger("predict")


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, load the run's best checkpoint and predict every scene."""
    from deflect.engine.distributed import cleanup_distributed, init_distributed
    from deflect.engine.logging import setup_logging
    from deflect.predict import DEFAULT_BLOCK, load_predictor, predict_scenes

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path, help="the trained run folder (or its adapter/)")
    parser.add_argument("inputs", nargs="*", type=Path, help="GeoTIFF scenes or folders of them")
    parser.add_argument(
        "--onnx", type=Path, default=None,
        help="run this exported file (scripts/export.py) with ONNX Runtime instead of a run "
        "folder's PyTorch model; every positional argument is then a scene",
    )  # fmt: skip
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--batch-size", type=int, default=8, help="tiles per forward pass")
    parser.add_argument(
        "--stride", type=int, default=None,
        help="sliding-window stride (default: the run's eval_stride, else half the window; "
        "classification: tiles side by side)",
    )  # fmt: skip
    parser.add_argument(
        "--block", type=int, default=DEFAULT_BLOCK,
        help=f"output block side in pixels, a multiple of the stride (default {DEFAULT_BLOCK})",
    )  # fmt: skip
    parser.add_argument(
        "--probabilities", action="store_true", help="also write <stem>_prob.tif (softmax)"
    )
    parser.add_argument("--bands", default="", help="the scenes' band names in file order, "
                        "e.g. B2,B3,B4,B8 (default: their band descriptions)")  # fmt: skip
    parser.add_argument(
        "--pattern", default=None,
        help="file names taken from input folders, e.g. '*_B.tif' (default: the images of a "
        "folder in the run's training layout, its masks left out; else every GeoTIFF)",
    )  # fmt: skip
    parser.add_argument(
        "--sensor", default=None,
        help="the scenes' sensor when it is not the model's, e.g. landsat8 for a Sentinel-2 "
        "model: bands are mapped to the trained ones by spyndex band and wavelength",
    )  # fmt: skip
    parser.add_argument(
        "--reflectance-scale", type=float, default=None,
        help="the scenes' stored value of reflectance 1.0 when it is not training's",
    )  # fmt: skip
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument(
        "--chips", dest="chips", action="store_const", const=True, default=None,
        help="classification runs: every file is one chip, classified whole into "
        "predictions.csv (default: files no larger than the training chips)",
    )  # fmt: skip
    kind.add_argument(
        "--scenes", dest="chips", action="store_const", const=False,
        help="classification runs: every file is a scene, one output pixel per tile",
    )  # fmt: skip
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--precision", default=None, choices=["fp32", "bf16", "fp16"],
        help="autocast precision (default: the run's)",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if args.onnx is not None:  # no run folder: every positional argument is a scene
        args.inputs = [args.run_dir, *args.inputs]
    elif not args.inputs:
        parser.error("give the run folder, then at least one scene or folder of scenes")

    info = init_distributed(args.device)
    setup_logging(None, info.is_main)
    try:
        if args.onnx is not None:
            from deflect.export.runtime import load_onnx_predictor

            predictor = load_onnx_predictor(args.onnx, args.stride)
        else:
            predictor = load_predictor(args.run_dir, info.device, args.precision, args.stride)
        bands = [b.strip() for b in args.bands.split(",") if b.strip()] or None
        outputs = predict_scenes(
            predictor, args.inputs, args.out, batch_size=args.batch_size, block=args.block,
            probabilities=args.probabilities, bands=bands,
            progress=info.is_main and not args.no_progress,
            rank=info.rank, world_size=info.world_size,
            pattern=args.pattern, sensor=args.sensor, reflectance_scale=args.reflectance_scale,
            chips=args.chips,
        )  # fmt: skip
        for out in outputs:
            log.info(
                "wrote %s%s",
                out.prediction,
                f" and {out.probabilities}" if out.probabilities else "",
            )
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main()
