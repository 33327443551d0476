r"""Per-band mean and standard deviation of a dataset's training split, for its config.

    python scripts/compute_stats.py dataset=folder dataset.root=/data/fields \
        dataset.classes=[crop,fallow,forest] dataset.nodata=-9999

Takes the same overrides as ``run.py``. Reads every training image once (valid pixels only: NaN
and the no-data value are left out), caches the result in ``<root>/band_stats.json`` with the
size and modification time of each file, and prints the ``band_stats`` block to paste into the
dataset config. A dataset with ``band_stats: null`` does the same on first use; this script
does it up front (``--force`` recomputes even when the cache is current).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> dict:
    from hydra import compose, initialize_config_dir

    from deflect.engine.build import build_dataset

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for run.py")
    parser.add_argument(
        "--force", action="store_true", help="recompute even if the cache is current"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=args.overrides)
    if "images" not in cfg.dataset:  # only the generic folder dataset computes its own statistics
        raise SystemExit(
            f"{cfg.dataset._target_} takes its band_stats from its config; compute_stats.py is "
            "for dataset=folder (datasets.GeoTIFFFolder)"
        )
    cfg.dataset.band_stats = None  # computed (or read from the cache) over the training split
    dataset = build_dataset(cfg, "train")
    stats = dataset.training_stats(dataset.spec.nodata, force=True) if args.force else {
        "mean": dict(zip(dataset.bands, dataset.spec.mean_list())),
        "std": dict(zip(dataset.bands, dataset.spec.std_list())),
    }  # fmt: skip
    fmt = lambda table: "{" + ", ".join(f"{b}: {v:.6g}" for b, v in table.items()) + "}"  # noqa: E731
    print(f"band_stats:   # {len(dataset)} training images of {dataset.root}")
    print(f"  mean: {fmt(stats['mean'])}")
    print(f"  std: {fmt(stats['std'])}")
    return stats


if __name__ == "__main__":
    main()
