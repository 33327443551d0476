"""The old home of the pictures and class-map GeoTIFFs, kept for its callers
(``deflect.engine.predict`` until it moves to ``deflect.predict``): they are engine-neutral now,
in :mod:`deflect.pictures` and :mod:`deflect.geotiff`, and the writers of a test split are the
tasks' own (``deflect/tasks/<task>/writer.py``)."""

from deflect.geotiff import (
    NODATA_CLASS,
    class_colours,
    describe_classes,
    describe_labels,
    write_prediction_geotiff,
)
from deflect.pictures import (
    PALETTE,
    colorize,
    compact,
    confusion_cells,
    rgb_composite,
    save_confusion_png,
    save_label_panels,
    save_panels,
    stretch_limits,
)

__all__ = [
    "NODATA_CLASS",
    "PALETTE",
    "class_colours",
    "colorize",
    "compact",
    "confusion_cells",
    "describe_classes",
    "describe_labels",
    "rgb_composite",
    "save_confusion_png",
    "save_label_panels",
    "save_panels",
    "stretch_limits",
    "write_prediction_geotiff",
]
