"""Scene listing and band selection: which files are scenes, and which of their bands the model
takes, in the model's order (by name, by common name or wavelength, or across sensors)."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from deflect.data import DataSpec, band_code, canonical_band, map_bands

log = logging.getLogger(__name__)

#: File suffixes of scenes.
SCENE_SUFFIXES = (".tif", ".tiff")
#: Name endings of scene prediction's own outputs, skipped when a folder is listed.
OUTPUT_ENDINGS = ("_pred.tif", "_prob.tif")


def list_scenes(
    inputs: Iterable[str | Path],
    pattern: str | None = None,
    layout: tuple[str | None, str | None] = (None, None),
) -> list[Path]:
    """The GeoTIFF scenes named by ``inputs``: files, and the .tif/.tiff files of folders.

    Files of a folder that end in ``_pred.tif`` or ``_prob.tif`` (this module's outputs) are
    skipped. With ``pattern``, only the files whose name matches it are taken. Without it, a
    folder in the training layout ``layout = (image pattern, mask pattern)`` gives its images
    (its masks are left out); any other folder gives every GeoTIFF.

    Args:
        inputs: files or folders.
        pattern: a file-name pattern (``fnmatch``: ``*`` and ``?``) for the files of folders.
        layout: the run's training image and mask file-name patterns (:func:`file_patterns`).

    Returns:
        The scenes, folders' files sorted by name.

    Raises:
        FileNotFoundError: an input does not exist, or a folder holds no matching GeoTIFF.
        ValueError: no inputs, or two scenes with the same name (their outputs would collide).
    """
    images, masks = layout
    scenes: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(
                p
                for p in path.iterdir()
                if p.is_file()
                and p.suffix.lower() in SCENE_SUFFIXES
                and not p.name.endswith(OUTPUT_ENDINGS)
            )
            if pattern is not None:
                found = [p for p in found if fnmatch.fnmatch(p.name, pattern)]
            elif images and any(fnmatch.fnmatch(p.name, images) for p in found):
                found = [p for p in found if fnmatch.fnmatch(p.name, images)]
                log.info("%s is in the training layout: its %s files (masks left out)", path,
                         images)  # fmt: skip
            elif masks:
                found = [p for p in found if not fnmatch.fnmatch(p.name, masks)]
            if not found:
                which = f"matching --pattern {pattern!r}" if pattern else ".tif or .tiff"
                raise FileNotFoundError(
                    f"folder {str(path)!r} holds no {which} scene; pass GeoTIFF files or a "
                    "folder of them"
                )
            scenes.extend(found)
        elif path.is_file():
            scenes.append(path)
        else:
            raise FileNotFoundError(f"input {str(path)!r} does not exist; pass GeoTIFF files")
    if not scenes:
        raise ValueError("no input scenes; pass GeoTIFF files or folders of them")
    stems: dict[str, Path] = {}
    for scene in scenes:
        if scene.stem in stems:
            raise ValueError(
                f"scenes {str(stems[scene.stem])!r} and {str(scene)!r} have the same name, so "
                f"both would write {scene.stem}_pred.tif; predict them into separate --out folders"
            )
        stems[scene.stem] = scene
    return scenes


def select_bands(
    count: int,
    descriptions: Sequence[str | None],
    spec: DataSpec,
    bands: Sequence[str] | None = None,
    source: str = "the scene",
    sensor: str | None = None,
) -> list[int]:
    """The scene's band numbers (1-based) holding the model's bands, in the model's order.

    With ``sensor`` other than the model's (a Landsat 8 scene for a Sentinel-2 model), the
    scene's bands are read as that sensor's and mapped to the trained ones by spyndex band and
    wavelength (:func:`~deflect.data.map_bands`); the mapping is logged.

    The scene's band names are ``bands`` when given, else its band descriptions when every band
    has one, else (a scene of exactly as many bands as the model takes) the training order,
    with a warning.

    Args:
        count: number of bands of the scene.
        descriptions: the scene's band descriptions (``src.descriptions``; None where unset).
        spec: the model's data description.
        bands: the scene's band names in file order, overriding the descriptions.
        source: the scene, for messages.

    Returns:
        1-based band indexes, one per band of ``spec.bands``.

    Raises:
        ValueError: ``bands`` of the wrong length, unnamed bands of another count than the
            model's, or model bands missing from the scene.
    """
    model_bands = list(spec.bands)
    if bands is not None:
        names = [str(b) for b in bands]
        if len(names) != count:
            raise ValueError(
                f"--bands names {len(names)} bands ({names}) but {source} has {count}; name "
                "every band of the file, in file order"
            )
    elif count and all(d for d in descriptions):
        names = [str(d) for d in descriptions]
    elif count == len(model_bands):
        log.warning(
            "%s has no band names (descriptions); assuming the training order %s. If that is "
            "wrong, give the file's order with --bands",
            source,
            ",".join(model_bands),
        )
        names = model_bands
    else:
        raise ValueError(
            f"{source} has {count} bands without names (descriptions) and the model takes "
            f"{len(model_bands)} ({model_bands}); give the file's band names in order with "
            "--bands B2,B3,..."
        )
    if sensor and sensor != spec.sensor:
        given = [band_code(n, sensor) for n in names]
        mapping = map_bands(spec.bands, spec.sensor, given, sensor)
        log.info("%s: %s bands mapped to the trained %s bands: %s", source, sensor, spec.sensor,
                 ", ".join(f"{t} <- {g}" for t, g, _, _ in mapping))  # fmt: skip
        return [given.index(g) + 1 for _, g, _, _ in mapping]
    # Codes, common names (Blue, NIR, SWIR 1) or wavelengths, for the model's sensor.
    canon = [band_code(n, spec.sensor) for n in names]
    renamed = [f"{n} -> {c}" for n, c in zip(names, canon) if canonical_band(n) != c]
    if renamed:
        log.info("%s: band names read as %s", source, ", ".join(renamed))
    missing = [b for b in model_bands if canonical_band(b) not in canon]
    if missing:
        raise ValueError(
            f"{source} lacks bands {missing} that the model needs: the scene has {names}, the "
            f"model takes {model_bands}. Use a scene with those bands (or, if its band names "
            "are wrong, give the right ones with --bands)"
        )
    return [canon.index(canonical_band(b)) + 1 for b in model_bands]
