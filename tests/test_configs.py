"""Every YAML in configs/ composes with Hydra and builds at tiny size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from deflect.engine import build
from tests.fakes import (
    north_up,
    write_chips,
    write_floods,
    write_folder_dataset,
    write_geobench,
    write_hls,
    write_mados,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
GROUPS = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir())
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONFIGS / g).glob("*.yaml"))]
SHRINK = [  # any encoder at tiny width, 32-px inputs
    "img_size=32",
    "encoder.arch_kwargs={embed_dim:32,depth:4,num_heads:4}",
    "encoder.output_layers=[0,1,2,3]",
    "segmentor.channels=8",
    "batch_size=2",
    "num_workers=0",
]


def write_random_folder(root: Path, bands: list[str], classes: int, targets: bool = False) -> None:
    """Two tiny georeferenced tiles per split in the folder layout: class masks, or with
    ``targets`` float target rasters (the class ids halved) as ``<name>_target.tif``."""
    rng = np.random.default_rng(0)
    tiles = []
    for split in ("train", "val", "test"):
        for i in range(2):
            image = rng.random((len(bands), 32, 32), dtype=np.float32)
            labels = rng.integers(0, classes, (1, 32, 32)).astype(np.uint8)
            tiles.append(
                (split, f"t{i}", image, labels.astype(np.float32) / 2 if targets else labels)
            )
    mask = "{split}/{name}_target.tif" if targets else "{split}/{name}_mask.tif"
    write_folder_dataset(root, tiles, bands, mask=mask, crs="EPSG:32631",
                         transform=north_up(0, 320, 10, 10))  # fmt: skip


def compose_with(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("config", overrides=overrides)


def dataset_overrides(option: str, demo_root: Path, tmp_path: Path) -> list[str]:
    writers = {"mados": write_mados, "hls_burn_scars": write_hls, "sen1floods11": write_floods}
    if option in writers:  # a tiny copy of the released layout
        return [f"dataset={option}", f"dataset.root={writers[option](tmp_path / option)}"]
    if option.startswith("m_"):  # a GEO-Bench task folder in the released layout
        from omegaconf import OmegaConf

        task = OmegaConf.load(CONFIGS / "dataset" / f"{option}.yaml")
        root = write_geobench(
            tmp_path / option, [f"c{i}" for i in range(4)], {"train": 4, "valid": 2, "test": 2},
            multi_label=bool(task.multi_label), channels=list(task.channels),
            scale=float(task.reflectance_scale) if task.reflectance_scale != 255 else 2550,
            date="2016-05-14" if option == "m_forestnet" else None,
        )  # fmt: skip
        return [f"dataset={option}", f"dataset.root={root}"]
    if option == "chips":
        root = write_chips(tmp_path / "chips", ["field", "forest", "water"])
        return ["dataset=chips", f"dataset.root={root}", "dataset.reflectance_scale=10000"]
    if option == "folder":
        bands = ["B2", "B3", "B4", "B8"]
        write_random_folder(tmp_path / "folder", bands, classes=3)
        return [
            "dataset=folder", f"dataset.root={tmp_path / 'folder'}",
            f"dataset.available_bands=[{','.join(bands)}]", "dataset.classes=[a,b,c]",
        ]  # fmt: skip
    if option == "folder_regression":
        root = tmp_path / "folder_regression"
        write_random_folder(root, ["B2", "B3", "B4", "B8"], classes=3, targets=True)
        return ["dataset=folder_regression", f"dataset.root={root}"]
    if option == "demo_regression":
        return [f"dataset={option}", f"dataset.root={tmp_path / 'demo_regression'}"]
    return [f"dataset={option}", f"dataset.root={demo_root}"]


def test_every_group_has_options():
    assert {"encoder", "dataset", "segmentor", "augmentation", "finetune"} <= set(GROUPS)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_config_composes_and_builds(group, option, demo_root, tmp_path):
    shrink = SHRINK
    if group == "dataset":
        overrides = dataset_overrides(option, demo_root, tmp_path)
    elif group in ("task", "loss") and option in ("classification", "regression"):
        dataset = {"classification": "chips", "regression": "folder_regression"}[option]
        overrides = dataset_overrides(dataset, demo_root, tmp_path)
    elif option.startswith("prithvi"):  # six HLS bands; the architecture is top-level
        overrides = [f"encoder={option}", *dataset_overrides("hls_burn_scars", demo_root, tmp_path)]
        shrink = [s for s in SHRINK if "arch_kwargs" not in s]
        shrink += [
            "encoder.embed_dim=32",
            "encoder.depth=4",
            "encoder.num_heads=4",
            "encoder.patch_size=8",
        ]
    else:
        overrides = [f"{group}={option}", f"dataset.root={demo_root}"]
        if option == "timm_vit":
            overrides.append("encoder.arch=vit_base_patch16_224")
    cfg = compose_with(overrides + shrink)
    OmegaConf.resolve(cfg)  # every interpolation resolves
    assert OmegaConf.missing_keys(cfg) == set()
    dataset = build.build_dataset(cfg, "train")
    model = build.build_model(cfg, dataset.spec)
    optimizer = build.build_optimizer(cfg, model)
    scheduler = build.build_scheduler(cfg, optimizer, total_steps=10)
    loader = build.build_loader(
        dataset,
        cfg,
        build.DistInfo(0, 1, 0, torch.device("cpu")),
        train=True,
        generator=torch.Generator(),
    )
    batch = next(iter(loader))
    assert batch["image"].shape == (2, len(dataset.bands), 32, 32)
    logits = model(batch["image"])
    task = build.build_task(cfg)
    if task.name == "classification":  # one logit per class (label) per image
        assert logits.shape == (2, dataset.num_classes)
    elif dataset.spec.targets:  # regression: one output per target per pixel
        assert logits.shape == (2, len(dataset.spec.targets), 32, 32)
    else:
        assert logits.shape == (2, dataset.num_classes, 32, 32)
    loss = build.build_loss(cfg, dataset.spec)(logits, task.target(batch))
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    scheduler.step()
    trainable = [p for p in model.parameters() if p.requires_grad]
    head = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
    assert trainable and head and all(p.grad is not None for p in head)


def test_method_configs_hold_only_the_methods_hyper_parameters():
    """Data facts reach the method at build time from the dataset, never through the YAML."""
    for path in sorted((CONFIGS / "finetune").glob("*.yaml")):
        assert "${" not in path.read_text(), f"{path.name} interpolates another group"


def test_every_method_starts_from_the_same_encoder_and_decoder(demo_root):
    models = {}
    for path in sorted((CONFIGS / "finetune").glob("*.yaml")):
        cfg = compose_with([f"finetune={path.stem}", f"dataset.root={demo_root}", *SHRINK])
        models[path.stem] = build.build_model(cfg, build.build_dataset(cfg, "train").spec)
    assert {"frozen", "lora", "scaled_lora", "deflect"} <= set(models)
    reference = models["frozen"].state_dict()
    for name, model in models.items():
        state = model.state_dict()
        decoder = [k for k in reference if not k.startswith("encoder.")]
        assert all(torch.equal(state[k], reference[k]) for k in decoder), name
        # Adapters wrap some modules (their weights move under `base_layer.`) and add their own
        # (`deflect_*`, `lora_*`, a band strategy's `bands_kernel`).
        base = {
            k.replace("base_layer.", ""): v
            for k, v in model.encoder.base_model.backbone.state_dict().items()
            if "deflect_" not in k and "lora_" not in k and "bands_kernel" not in k
        }
        frozen = models["frozen"].encoder.base_model.backbone.state_dict()
        assert base.keys() == frozen.keys(), name
        assert all(torch.equal(base[k], frozen[k]) for k in frozen), name


def test_activation_checkpointing_key_reaches_every_encoder_block(demo_root):
    from deflect.encoders.recompute import is_checkpointed

    for value in (False, True):
        overrides = [f"activation_checkpointing={value}", f"dataset.root={demo_root}", *SHRINK]
        cfg = compose_with(overrides)
        model = build.build_model(cfg, build.build_dataset(cfg, "train").spec)
        assert [is_checkpointed(b) for b in model.encoder.blocks] == [value] * 4


def test_band_table_asks_each_part_what_it_does_with_each_band(demo_root):
    rows = {}
    for finetune in ("frozen", "deflect"):
        cfg = compose_with([f"finetune={finetune}", f"dataset.root={demo_root}", *SHRINK])
        model = build.build_model(cfg, build.build_dataset(cfg, "train").spec)
        table = build.band_table(model)
        rows[finetune] = {line.split()[0]: line for line in table.splitlines()[1:]}
    assert "channel 0" in rows["frozen"]["B4"]  # encoder.pretrained_bands = [B4, B3, B2]
    assert "channel 2" in rows["frozen"]["B2"]
    assert rows["frozen"]["not"].endswith("B8")  # "not used by the model: B8"
    b8 = rows["deflect"]["B8"]  # NIR: no pretrained channel, but raw + the NIR indices
    assert "channel" not in b8 and all(i in b8 for i in ("NDVI", "NDWI", "EVI", "SAVI"))
    assert "NDWI" in rows["deflect"]["B3"] and "NDVI" not in rows["deflect"]["B3"]
    assert "not" not in rows["deflect"]  # every band feeds the model
    assert rows["deflect"]["B4"].split()[-1] == "R" and rows["deflect"]["B2"].split()[-1] == "B"


@pytest.mark.parametrize("option", ["folder_regression", "demo_regression"])
def test_the_regression_dataset_yamls_build_their_datasets(option, demo_root, tmp_path):
    """Every key of the regression dataset YAMLs is an argument of their dataset, whose samples
    hold a float target per pixel (composed with the regression task in the test above)."""
    from hydra.utils import instantiate

    root = dataset_overrides(option, demo_root, tmp_path)[1].split("=", 1)[1]
    node = OmegaConf.load(CONFIGS / "dataset" / f"{option}.yaml")
    node.pop("defaults")
    node.pop("img_size")
    node.root = root
    if option == "folder_regression":
        node.available_bands = ["B2", "B3", "B4", "B8"]
    dataset = instantiate(node, split="train", _convert_="all")
    sample = dataset[0]
    assert sample["target"].dtype == torch.float32
    assert sample["target"].shape == (len(dataset.spec.targets), *sample["image"].shape[-2:])
