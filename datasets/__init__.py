"""Datasets: a GeoTIFF base class, one module per dataset, joint transforms and the demo."""

from datasets.base import (
    SPLITS,
    BandMappedDataset,
    FolderSegmentation,
    GeoTIFFSegmentationDataset,
    Sample,
    read_raster,
)
from datasets.demo import DEMO_BAND_STATS, DEMO_CLASSES, DemoVegetation, prepare_demo
from datasets.folder import GeoTIFFFolder, compute_band_stats
from datasets.hls_burn_scars import HLSBurnScars
from datasets.mados import MADOS, MADOS_CLASSES
from datasets.sen1floods11 import Sen1Floods11
from datasets.transforms import JointTransform, build_transform

__all__ = [
    "BandMappedDataset",
    "DEMO_BAND_STATS",
    "DEMO_CLASSES",
    "SPLITS",
    "DemoVegetation",
    "FolderSegmentation",
    "GeoTIFFFolder",
    "GeoTIFFSegmentationDataset",
    "HLSBurnScars",
    "JointTransform",
    "MADOS",
    "MADOS_CLASSES",
    "Sample",
    "Sen1Floods11",
    "build_transform",
    "compute_band_stats",
    "prepare_demo",
    "read_raster",
]
