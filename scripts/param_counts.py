r"""What each fine-tuning method trains on an encoder for a set of bands, before any training.

    python scripts/param_counts.py --encoder vit_b16 \
        --bands B1,B2,B3,B4,B5,B6,B7,B8,B8A,B11,B12 --sensor sentinel2a

Builds the encoder from its Hydra config (random weights: counts do not depend on them) with
every registered method in turn, by the same code as ``run.py``, and prints a markdown table: the
encoder's trainable parameters, their % of the GFM's own parameters, and the adapter's size; LoRA
and SLR also at ``rank: auto`` (DEFLECT's count on the same encoder and bands), with the rank it
picks. The decoder is left out, as in the paper.

The budget-matched baselines sit beside DEFLECT: ``spectral_kernel_new`` (only the new bands'
kernel columns train, ``D·(C - P)·p²``) against ``spectral_kernel`` (the whole kernel,
``D·C·p²``), and LoRA at ``rank: auto`` (``finetune=lora_auto``). ViT-B/16 with the 7 bands
B2, B3, B4, B8, B8A, B11, B12: DEFLECT 192,008, the whole kernel 1,376,256, the new bands'
columns 786,432, LoRA rank 1 147,456.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ORDER = [
    "frozen",
    "bitfit",
    "norm_tuning",
    "deflect",
    "spectral_kernel_new",
    "spectral_kernel",
    "lora",
    "scaled_lora",
    "full",
]


def count(encoder: str, bands: list[str], sensor: str, img_size: int, finetune: str,
          overrides: list[str]) -> tuple[int, int, object]:  # fmt: skip
    """``(trainable, gfm, resolved config)`` of ``finetune`` on ``encoder`` for ``bands``."""
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from deflect.data import DataSpec
    from deflect.tuners import get_deflect_model

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[f"encoder={encoder}", f"finetune={finetune}", f"img_size={img_size}",
                       *overrides],
        )  # fmt: skip
    data = DataSpec(
        bands=tuple(bands),
        mean=dict.fromkeys(bands, 0.0),
        std=dict.fromkeys(bands, 1.0),
        reflectance_scale=10000,
        sensor=sensor,
        classes=("a", "b"),
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-weights warning: counts need no weights
        model = instantiate(cfg.encoder, _partial_=True, _convert_="all")(data=data)
    adapted = get_deflect_model(model, instantiate(cfg.finetune, _convert_="all"))
    trainable, gfm = adapted.get_nb_trainable_parameters()
    return trainable, gfm, adapted.peft_config["default"]


def main(argv: list[str] | None = None) -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", default="vit_b16")
    parser.add_argument("--bands", default="B1,B2,B3,B4,B5,B6,B7,B8,B8A,B11,B12")
    parser.add_argument("--sensor", default="sentinel2a")
    parser.add_argument("--img-size", type=int, default=224)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    bands = args.bands.split(",")
    rows = [(m, []) for m in ORDER]
    rows += [("lora", ["finetune.rank=auto"]), ("scaled_lora", ["finetune.rank=auto"])]
    rows += [("lora", ["finetune.band_strategy=rgb_random"])]
    print(f"{args.encoder}, {len(bands)} bands ({', '.join(bands)}), {args.img_size} px\n")
    print("| method | trainable | % of GFM tuned | adapter (fp32) |")
    print("|---|---:|---:|---:|")
    for method, overrides in rows:
        trainable, gfm, config = count(
            args.encoder, bands, args.sensor, args.img_size, method, overrides
        )
        label = " ".join([method, *overrides])
        if getattr(config, "rank", None) is not None:
            label += f" (rank {config.rank})"
        size = trainable * 4 / 2**20
        print(f"| {label} | {trainable:,} | {100 * trainable / gfm:.4f} % | {size:.2f} MiB |")
    print(f"\nGFM parameters (without the decoder): {gfm:,}")


if __name__ == "__main__":
    main()
