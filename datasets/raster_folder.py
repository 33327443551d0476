"""One raster-folder layer: what a folder of GeoTIFFs says about itself, for the folder
dataset (scenes: :mod:`datasets.folder`) and the own-chips dataset (chips:
:mod:`datasets.classification`) alike.

* the files' headers (size, band count, CRS, band descriptions, declared no-data), read once;
* band names from the headers (:func:`header_band_names`): every file read by its own names,
  codes, common names or wavelengths resolved for the sensor (:func:`resolve_bands`);
* the no-data value the files declare (:func:`declared_nodata`);
* per-band statistics over the training files (:func:`compute_band_stats`), cached in
  ``<root>/band_stats.json`` with a fingerprint of every file they came from
  (:func:`cached_band_stats`), recomputed when one changes;
* each fact logged once per process (:func:`log_once`): the three splits say the same things.

The validity of a pixel (:func:`deflect.data.valid_pixels`) and band-name resolution
(:func:`deflect.data.band_code`) are the framework's rules, shared with prediction.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datasets.base import _open_raster, _read_bands
from deflect.data import band_code, resolve_band_name, sensor_band_codes, valid_pixels
from deflect.io import atomic_path

log = logging.getLogger(__name__)

STATS_FILE = "band_stats.json"
STATS_VERSION = 2  # 2: file records hold a content fingerprint and the file's band order


#: Bytes of a file hashed for the statistics cache: this many chunks of this size, spread evenly.
FINGERPRINT_CHUNKS, FINGERPRINT_CHUNK = 16, 4096


def content_fingerprint(path: Path) -> str:
    """A cheap digest of a file's contents: BLAKE2 of 16 chunks of 4 KiB spread over it (the
    whole file when smaller). Catches contents rewritten with size and time kept."""
    size = path.stat().st_size
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        if size <= FINGERPRINT_CHUNKS * FINGERPRINT_CHUNK:
            digest.update(f.read())
        else:
            step = (size - FINGERPRINT_CHUNK) // (FINGERPRINT_CHUNKS - 1)
            for i in range(FINGERPRINT_CHUNKS):
                f.seek(i * step)
                digest.update(f.read(FINGERPRINT_CHUNK))
    return digest.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """Size, modification time and a content fingerprint: what the statistics cache compares."""
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "content": content_fingerprint(path)}  # fmt: skip


@dataclass(frozen=True)
class FileHeader:
    """What a GeoTIFF's header says (no pixels read)."""

    height: int
    width: int
    count: int
    crs: Any
    descriptions: tuple[str | None, ...]
    nodata: float | None


_HEADERS: dict[tuple[Path, int, int], FileHeader] = {}


def file_header(path: Path) -> FileHeader:
    """The header of ``path``, cached by path, size and time (the three splits of a dataset
    are built from the same files)."""
    stat = Path(path).stat() if Path(path).is_file() else None
    key = (Path(path), stat.st_size, stat.st_mtime_ns) if stat else None
    if key is not None and key in _HEADERS:
        return _HEADERS[key]
    with _open_raster(path) as src:
        header = FileHeader(src.height, src.width, src.count, src.crs, tuple(src.descriptions),
                            src.nodata)  # fmt: skip
    if key is not None:
        _HEADERS[key] = header
    return header


_LOGGED: set[str] = set()


def log_once(emit, message: str) -> None:
    """Log ``message`` once per process (the three splits of a dataset say the same things)."""
    if message not in _LOGGED:
        _LOGGED.add(message)
        emit(message)


def _codes(sensor: str) -> set[str]:
    try:
        return set(sensor_band_codes(sensor))
    except ValueError:
        return set()


def resolve_bands(names: list[str], sensor: str, source: str, fix: str, owner: str) -> list[str]:
    """Band names as files and configs give them (codes, common names, wavelengths) -> the
    framework's codes for ``sensor``; short codes spyndex does not know (VV, VH, DEM) are kept.

    Raises:
        ValueError: a name that maps to nothing, or two names mapping to one band.
    """
    out = []
    for given in names:
        band = band_code(given, sensor)
        if resolve_band_name(given, sensor) is None:
            if not re.fullmatch(r"[A-Z][A-Z0-9]{0,3}", band):  # a code (VV, VH, HH, DEM, ...)
                raise ValueError(
                    f"{owner}: band {given!r} of {source} is neither a band of sensor {sensor!r} "
                    f"({sorted(_codes(sensor))}) nor a common name (Blue, Green, Red, NIR, NIR "
                    f"Narrow, Red Edge 1, SWIR 1, SWIR 2, ...) or a wavelength (842 nm) of one; {fix}"
                )
        out.append(band)
    repeated = sorted({b for b in out if out.count(b) > 1})
    if repeated:
        raise ValueError(
            f"{owner}: {source} names bands {names}, which map to {out}: {repeated} twice; {fix}"
        )
    return out


def compute_band_stats(
    images: list[Path], nodata: float | None, orders: list[list[int]] | None = None
) -> tuple[list[float], list[float], list[int]]:
    """Mean, standard deviation (population) and number of valid pixels of every band over
    ``images``, in file units: NaN, infinities and ``nodata`` are left out. Files are combined
    exactly with Chan et al.'s pairwise update (float64), one file in memory at a time.

    Args:
        images: the files.
        nodata: the no-data value, or None.
        orders: per file, the 1-based band numbers to read, in the output's band order (files
            whose bands are in another order); None reads every band in file order.

    Raises:
        ValueError: a band without a single valid pixel.
        OSError: a file whose pixels cannot be read (names it).
    """
    count = mean = m2 = None
    for i, path in enumerate(images):
        with _open_raster(path) as src:
            raw = _read_bands(src, path, orders[i] if orders else None)  # (C, H, W)
        valid = valid_pixels(raw, nodata)
        x = raw.astype(np.float64)
        n_f = valid.sum(axis=(1, 2)).astype(np.float64)  # (C,)
        sums = np.where(valid, x, 0.0).sum(axis=(1, 2))
        mean_f = np.divide(sums, n_f, out=np.zeros_like(sums), where=n_f > 0)
        m2_f = np.where(valid, (x - mean_f[:, None, None]) ** 2, 0.0).sum(axis=(1, 2))
        if count is None:
            count, mean, m2 = n_f, mean_f, m2_f
            continue
        total = count + n_f
        delta = mean_f - mean
        safe = np.where(total > 0, total, 1.0)
        mean = mean + delta * n_f / safe
        m2 = m2 + m2_f + delta**2 * count * n_f / safe
        count = total
    empty = [i for i, n in enumerate(count) if n == 0]
    if empty:
        raise ValueError(f"band(s) {empty} have no valid pixel in the training images")
    std = np.sqrt(m2 / count)
    return mean.tolist(), std.tolist(), count.astype(int).tolist()


@dataclass(frozen=True)
class BandNames:
    """The bands of a folder's files, by name.

    Args:
        bands: the band codes, in the first file's order (or ``available_bands``').
        sources: how the files (or the config) name each band (``{"B8": "NIR"}``).
        orders: per file, its own band codes in file order, when read from its descriptions.
    """

    bands: list[str]
    sources: dict[str, str]
    orders: dict[Path, list[str]]

    def order(self, path: Path) -> list[str]:
        """The band codes of ``path`` in file order."""
        return self.orders.get(path, self.bands)

    def indexes(self, path: Path, bands: Iterable[str]) -> list[int]:
        """The 1-based band numbers of ``bands`` in ``path``, found by name."""
        order = self.order(path)
        return [order.index(b) + 1 for b in bands]


def header_band_names(files: Iterable[Path], available_bands: list[str] | None, sensor: str,
                      owner: str, what: str = "image") -> BandNames:  # fmt: skip
    """The bands of ``files`` (GeoTIFFs, the first one first) by name.

    From ``available_bands`` (the same order for every file; its length must be the first
    file's band count) or, when it is null, from each file's own band descriptions: every file
    is then read by name, whatever its order.

    Raises:
        ValueError: naming the file and the fix: a band count other than ``available_bands``',
            a file without band descriptions, a name that maps to no band, files holding other
            bands.
    """
    files = list(files)
    fix = "give dataset.available_bands=[...] in file order"
    if available_bands is not None:
        bands = resolve_bands([str(b) for b in available_bands], sensor,
                              "dataset.available_bands", "fix dataset.available_bands", owner)  # fmt: skip
        count = file_header(files[0]).count
        if len(bands) != count:
            raise ValueError(
                f"{owner}: dataset.available_bands lists {len(bands)} bands {bands} but "
                f"{str(files[0])!r} has {count}"
            )
        return BandNames(bands, dict(zip(bands, (str(b) for b in available_bands))), {})
    reference = None
    orders: dict[Path, list[str]] = {}
    for path in files:
        header = file_header(path)
        if not all(header.descriptions):
            raise ValueError(
                f"{owner}: {str(path)!r} has no band descriptions to name its {header.count} "
                f"bands; {fix}"
            )
        order = resolve_bands(list(header.descriptions), sensor, repr(str(path)), fix, owner)
        if reference is None:
            reference = (path, order, list(header.descriptions))
        elif set(order) != set(reference[1]):
            raise ValueError(
                f"{owner}: {str(path)!r} has bands {order} but {str(reference[0])!r} has "
                f"{reference[1]}; every {what} must hold the same bands (in any order: they are "
                "read by name)"
            )
        orders[path] = order
    _, bands, names = reference
    return BandNames(bands, dict(zip(bands, names)), orders)


def declared_nodata(files: Iterable[Path], nodata: float | None, owner: str,
                    what: str = "image") -> float | None:  # fmt: skip
    """The no-data value: ``nodata`` (``dataset.nodata``) when given, else the one the files'
    headers declare (they must agree; NaN is always invalid and needs no declaring).

    Raises:
        ValueError: files declaring different values without ``nodata`` to settle it.
    """
    declared: dict[float, Path] = {}
    for path in files:
        value = file_header(path).nodata
        if value is not None and not np.isnan(value):
            declared.setdefault(float(value), path)
    if nodata is not None:
        other = {v: p for v, p in declared.items() if v != float(nodata)}
        if other:
            value, path = next(iter(other.items()))
            log_once(
                log.warning,
                f"{owner}: dataset.nodata={nodata:g} overrides the no-data value {value:g} that "
                f"{str(path)!r} declares: pixels of {value:g} are read as data",
            )
        return nodata
    if len(declared) > 1:
        (a, pa), (b, pb) = list(declared.items())[:2]
        raise ValueError(
            f"{owner}: the {what} files declare different no-data values: {a:g} in "
            f"{str(pa)!r}, {b:g} in {str(pb)!r}; set dataset.nodata to the value that marks "
            "missing pixels in all of them (or fix the files' no-data tags)"
        )
    if declared:
        value, path = next(iter(declared.items()))
        log_once(
            log.info,
            f"no-data value {value:g} from the {what} files' headers (e.g. {str(path)!r}); "
            "dataset.nodata overrides it",
        )
        return value
    return None


def cached_band_stats(root: Path, train: list[Path], names: BandNames, nodata: float | None,
                      owner: str, noun: str = "training images", force: bool = False,
                      before_compute: Callable[[], None] | None = None) -> dict[str, dict]:  # fmt: skip
    """Per-band mean and std over the training files ``train``: read from
    ``<root>/band_stats.json`` when it was computed from exactly these files (size, time, a
    sample of their bytes, band order) with this no-data value, else computed
    (:func:`compute_band_stats`) and cached. Said once per process: the three splits of a
    dataset read the same statistics.

    Args:
        root: the dataset's folder (the cache lives there; file records are relative to it).
        train: the training files.
        names: their bands (:func:`header_band_names`).
        nodata: the no-data value.
        owner: the dataset, for messages; ``noun``: what the files are ("training chips").
        force: recompute even when the cache is current.
        before_compute: called before computing (a check of the training labels).
    """
    if not train:
        raise ValueError(f"{owner}: no {noun} to compute band statistics from")
    bands = names.bands
    files = {}
    for path in train:
        record = file_record(path)
        if names.order(path) != bands:
            record["bands"] = names.order(path)
        files[path.relative_to(root).as_posix()] = record
    key = {"version": STATS_VERSION, "bands": bands, "nodata": nodata, "files": files}
    cache = root / STATS_FILE
    cached = f"band statistics from {cache} ({len(files)} {noun})"
    if cache.is_file() and not force:
        try:
            saved = json.loads(cache.read_text())
            if {k: saved.get(k) for k in key} == key:
                log_once(log.info, cached)
                return {"mean": saved["mean"], "std": saved["std"]}
        except (OSError, ValueError):
            pass
    start = time.time()
    if before_compute is not None:
        before_compute()
    mean, std, pixels = compute_band_stats(train, nodata, [names.indexes(p, bands) for p in train])
    stats = {"mean": dict(zip(bands, mean)), "std": dict(zip(bands, std))}
    log.info("computed band statistics over %d %s in %.1f s (cached in %s; recomputed when "
             "those files change)", len(train), noun, time.time() - start, cache)  # fmt: skip
    log_once(lambda _: None, cached)  # the other splits read them back: said once is enough
    try:
        with atomic_path(cache) as tmp:
            tmp.write_text(json.dumps({**key, **stats, "pixels": dict(zip(bands, pixels))},
                                      indent=1))  # fmt: skip
    except OSError as err:
        log.warning("could not cache band statistics in %s (%s); they are recomputed next time",
                    cache, err)  # fmt: skip
    return stats


def read_named_bands(path: Path, names: BandNames, bands: list[str],
                     georeferenced: bool = True) -> np.ndarray:  # fmt: skip
    """The bands ``bands`` of ``path``, found by name in its own file's order: (C, H, W) in the
    file's dtype.

    Raises:
        ValueError: the file's band count changed since the folder was listed.
    """
    order = names.order(path)
    with _open_raster(path, georeferenced) as src:
        if src.count != len(order):
            raise ValueError(
                f"GeoTIFF {str(path)!r} has {src.count} bands but {len(order)} were expected "
                f"({order}); the file changed since the dataset was listed"
            )
        return _read_bands(src, path, names.indexes(path, bands))
