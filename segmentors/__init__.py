"""Modules after the encoder: feature-pyramid neck, UperNet, losses and the Segmentor."""

from segmentors.losses import SegmentationLoss
from segmentors.neck import ViTFeaturePyramid
from segmentors.segmentor import Segmentor
from segmentors.upernet import UperNetHead

__all__ = ["SegmentationLoss", "Segmentor", "UperNetHead", "ViTFeaturePyramid"]
