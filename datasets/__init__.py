"""Datasets: a GeoTIFF base class, one module per dataset, joint transforms and the demo."""

from datasets.base import (
    SPLITS,
    BandMappedDataset,
    FolderSegmentation,
    GeoTIFFSegmentationDataset,
    Sample,
    read_raster,
)
from datasets.classification import ChipFolder, ImageClassificationDataset
from datasets.demo import (
    DEMO_BAND_STATS,
    DEMO_CLASSES,
    DemoIndexRegression,
    DemoVegetation,
    prepare_demo,
)
from datasets.folder import GeoTIFFFolder, GeoTIFFFolderRegression, compute_band_stats
from datasets.geobench import GeoBench
from datasets.hls_burn_scars import HLSBurnScars
from datasets.mados import MADOS, MADOS_CLASSES
from datasets.sen1floods11 import Sen1Floods11
from datasets.transforms import (
    ImageTransform,
    JointTransform,
    build_classification_transform,
    build_transform,
)

__all__ = [
    "BandMappedDataset",
    "ChipFolder",
    "DEMO_BAND_STATS",
    "DEMO_CLASSES",
    "SPLITS",
    "DemoIndexRegression",
    "DemoVegetation",
    "FolderSegmentation",
    "GeoTIFFFolder",
    "GeoTIFFFolderRegression",
    "GeoBench",
    "GeoTIFFSegmentationDataset",
    "HLSBurnScars",
    "ImageClassificationDataset",
    "ImageTransform",
    "JointTransform",
    "MADOS",
    "MADOS_CLASSES",
    "Sample",
    "Sen1Floods11",
    "build_classification_transform",
    "build_transform",
    "compute_band_stats",
    "prepare_demo",
    "read_raster",
]
