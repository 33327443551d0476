"""Datasets: a GeoTIFF base class, one module per dataset, joint transforms and the demo."""

from datasets.base import (
    SPLITS,
    FolderSegmentation,
    GeoTIFFSegmentationDataset,
    Sample,
    read_raster,
)
from datasets.demo import DEMO_BAND_STATS, DEMO_CLASSES, DemoVegetation, prepare_demo
from datasets.transforms import JointTransform, build_transform

__all__ = [
    "DEMO_BAND_STATS",
    "DEMO_CLASSES",
    "SPLITS",
    "DemoVegetation",
    "FolderSegmentation",
    "GeoTIFFSegmentationDataset",
    "JointTransform",
    "Sample",
    "build_transform",
    "prepare_demo",
    "read_raster",
]
