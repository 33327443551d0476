"""Build every component from the composed config: the one place ``instantiate`` is called.

Components take plain typed arguments; only this module reads the config tree.
"""

from __future__ import annotations

import logging

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from datasets.transforms import build_transform
from deflect.engine.distributed import DistInfo, ShardSampler
from segmentors import SegmentationLoss

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def build_dataset(cfg: DictConfig, split: str):
    """The dataset of ``split`` with its joint transform (augmentation only for training)."""
    aug = cfg.augmentation
    transform = build_transform(
        bands=list(cfg.dataset.bands),
        band_stats=OmegaConf.to_container(cfg.dataset.band_stats, resolve=True),
        train=split == "train",
        crop_size=int(cfg.img_size),
        hflip=float(aug.hflip),
        vflip=float(aug.vflip),
        rot90=bool(aug.rot90),
        ignore_index=int(cfg.dataset.ignore_index),
        min_labelled_fraction=float(aug.min_labelled_fraction),
    )
    return instantiate(cfg.dataset, split=split, transform=transform, _convert_="all")


def build_loader(
    dataset, cfg: DictConfig, info: DistInfo, train: bool, generator: torch.Generator | None = None
) -> torch.utils.data.DataLoader:
    """Training loader (shuffled, sharded by DistributedSampler, full batches) or an evaluation
    loader (each sample exactly once across ranks)."""
    if train:
        if info.distributed:
            sampler = torch.utils.data.DistributedSampler(
                dataset,
                info.world_size,
                info.rank,
                shuffle=True,
                seed=int(cfg.seed),
                drop_last=True,
            )
        else:
            sampler = torch.utils.data.RandomSampler(dataset, generator=generator)
        batch_size = int(cfg.batch_size)
        if len(sampler) < batch_size:
            raise ValueError(
                f"the training split has {len(sampler)} samples per process, fewer than "
                f"batch_size={batch_size}; lower batch_size"
            )
    else:
        sampler = ShardSampler(len(dataset), info.rank, info.world_size)
        batch_size = int(cfg.eval_batch_size)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=int(cfg.num_workers),
        drop_last=train,
        pin_memory=info.device.type == "cuda",
        generator=generator,
        persistent_workers=False,  # persistent workers grew memory without bound in a peer
    )


def build_tuner_config(cfg: DictConfig):
    """The fine-tuning method's config object (``finetune`` group)."""
    return instantiate(cfg.finetune, _convert_="all")


def build_model(cfg: DictConfig, input_bands: list[str], num_classes: int) -> nn.Module:
    """Encoder -> fine-tuning method -> segmentor.

    Each part is seeded on its own, so frozen random weights are repeatable and every method
    starts from the same encoder and the same decoder: an ablation compares methods, not seeds.
    """
    from deflect.tuners import get_deflect_model

    seed = int(cfg.seed)
    torch.manual_seed(seed)
    encoder = instantiate(cfg.encoder, input_bands=list(input_bands), _convert_="all")
    torch.manual_seed(seed + 1)
    encoder = get_deflect_model(encoder, build_tuner_config(cfg))
    torch.manual_seed(seed + 2)
    return instantiate(cfg.segmentor, encoder=encoder, num_classes=num_classes, _convert_="all")


def build_loss(cfg: DictConfig, num_classes: int) -> SegmentationLoss:
    """Cross-entropy with ignore_index, optional class weights and dice."""
    return SegmentationLoss(
        num_classes=num_classes,
        ignore_index=int(cfg.dataset.ignore_index),
        class_weights=list(cfg.loss.class_weights) if cfg.loss.class_weights else None,
        dice_weight=float(cfg.loss.dice_weight),
    )


def build_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimiser over trainable parameters, in four groups: encoder (adapters, or the whole
    ViT under ``full``) at ``encoder_lr_scale`` x lr, decoder at lr; no weight decay on biases,
    norms and tokens."""
    optimizer = instantiate(cfg.optimizer, _convert_="all")
    base_lr = float(cfg.optimizer.lr)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            key = (name.startswith("encoder."), param.ndim >= 2)
            groups.setdefault(key, []).append(param)
    if not groups:
        raise ValueError("the model has no trainable parameters; check the finetune config")
    scale = float(cfg.encoder_lr_scale)
    return optimizer(
        [
            {
                "params": params,
                "lr": base_lr * (scale if in_encoder else 1.0),
                **({} if decay else {"weight_decay": 0.0}),
            }
            for (in_encoder, decay), params in sorted(groups.items())
        ]
    )


def build_scheduler(cfg: DictConfig, optimizer, total_steps: int):
    """The per-step learning-rate schedule."""
    return instantiate(cfg.scheduler, _convert_="all")(optimizer, total_steps=total_steps)


def parameter_counts(model: nn.Module) -> dict[str, int | float]:
    """Trainable and total parameters of the encoder (the GFM, adapters counted apart) and of
    the decoder; the percentage is of the GFM's own parameters, as the paper reports it."""
    encoder_trainable, gfm = model.encoder.get_nb_trainable_parameters()
    encoder_total = sum(p.numel() for p in model.encoder.parameters())
    decoder = [p for name, p in model.named_parameters() if not name.startswith("encoder.")]
    decoder_total = sum(p.numel() for p in decoder)
    decoder_trainable = sum(p.numel() for p in decoder if p.requires_grad)
    return {
        "gfm": gfm,
        "adapter": encoder_total - gfm,
        "encoder_total": encoder_total,
        "encoder_trainable": encoder_trainable,
        "encoder_trainable_percent": 100.0 * encoder_trainable / max(gfm, 1),
        "decoder_trainable": decoder_trainable,
        "total": encoder_total + decoder_total,
        "trainable": encoder_trainable + decoder_trainable,
    }


def band_table(model: nn.Module, bands: list[str]) -> str:
    """What each dataset band feeds: the pretrained RGB patch embedding (which input channel)
    and, under DEFLECT, the spectral stream (raw band, spectral indices). Logged at start so
    nothing is mapped, filled or dropped unseen."""
    import spyndex

    from deflect.tuners import DeflectConfig
    from deflect.tuners.deflect.indices import band_symbols

    encoder = model.encoder
    rgb = list(encoder.rgb_bands)
    config = getattr(encoder, "peft_config", {}).get(getattr(encoder, "active_adapter", ""), None)
    uses: dict[str, list[str]] = {b: [] for b in bands}
    lines = []
    if isinstance(config, DeflectConfig):
        symbol_channel = band_symbols(bands, config.sensor, config.nir_from_b8a)
        for index in config.resolved_indices():
            for symbol in spyndex.indices[index].bands:
                if symbol in symbol_channel:
                    uses[bands[symbol_channel[symbol]]].append(index)
    width = max(4, *(len(b) for b in bands))
    lines.append(f"{'band':<{width}}  RGB patch embedding   spectral stream (DEFLECT UPE)")
    for band in bands:
        rgb_use = f"input channel {rgb.index(band)}" if band in rgb else "-"
        if isinstance(config, DeflectConfig):
            parts = (["raw"] if config.raw_bands else []) + uses[band]
            spectral = ", ".join(parts) if parts else "unused"
        else:
            spectral = "-"
        lines.append(f"{band:<{width}}  {rgb_use:<20}  {spectral}")
    unused = [b for b in bands if b not in rgb and not isinstance(config, DeflectConfig)]
    if unused:
        lines.append(f"not used by the encoder: {', '.join(unused)}")
    return "\n".join(lines)
