"""What a model needs to know about its data, in one validated place: :class:`DataSpec`.

A dataset builds one ``DataSpec`` from its configuration; the build step hands the same object to
the encoder (which bands it is fed, which pixels are invalid) and to the tuner (DEFLECT needs the
band statistics to undo the normalisation, the reflectance scale, the sensor for spyndex's
wavelengths). Library users build one by hand. Every check on band names and statistics lives
in :meth:`DataSpec.__post_init__` and nowhere else.

Conventions shared by every part of the framework:

* images reach the model normalised, ``(x - mean) / std`` per band, in the units of the files;
* an invalid pixel (the dataset's no-data value, NaN, padding added by a crop or a sliding
  window) is ``NaN`` in the model input. Encoders feed it to pretrained layers as 0 (the band
  mean); DEFLECT keeps it out of the spectral indices and the pixel-set statistics.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any


def valid_pixels(raw, nodata: float | Iterable[float] | None = None):
    """The no-data validity rule, the one place it is written: a pixel of a raster read from a
    file (numpy, the file's dtype) is valid when it is finite and equals none of the no-data
    value(s). Used by training, evaluation, the statistics and prediction alike.

    No-data is compared in the file's own dtype: in float32, large integers near the no-data
    value would compare equal to it (16777217 == 16777216).
    """
    import numpy as np

    valid = np.isfinite(raw) if np.issubdtype(raw.dtype, np.floating) else np.ones(raw.shape, bool)
    values = [] if nodata is None else [nodata] if np.isscalar(nodata) else list(nodata)
    for value in values:
        valid &= raw != value
    return valid


def invalid_to_nan(raw, nodata: float | Iterable[float] | None = None):
    """A raster read from a file (numpy ``(C, H, W)``, the file's dtype) as float32 with NaN at
    its invalid pixels (:func:`valid_pixels`: non-finite values and the no-data value(s))."""
    import numpy as np

    image = raw.astype(np.float32)
    image[~valid_pixels(raw, nodata)] = np.nan
    return image


#: The true-colour bands (red, green, blue): the default display bands, and the pretrained
#: bands of an RGB ViT.
RGB_BANDS: tuple[str, ...] = ("B4", "B3", "B2")


def check_bool(value: object, key: str) -> bool:
    """``value`` when it is a boolean. Anything else is refused, naming ``key``: Python's
    ``bool()`` would take ``no``, ``"false"`` or ``"0"`` (non-empty strings) as true."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":  # numpy's too
        return bool(value)
    raise ValueError(f"{key}={value!r}: expected true or false; e.g. {key}=true")


def canonical_band(name: str) -> str:
    """Canonical Sentinel-2 band name: ``B02`` -> ``B2``, ``b8a`` -> ``B8A``; others upper-cased."""
    return re.sub(r"^B0(\d)", r"B\1", str(name).strip().upper())


# Names that files and tools give bands (GeoTIFF band descriptions, STAC common names), spelt
# in lower case without spaces or punctuation, -> spyndex's band symbols.
_BAND_ALIASES: dict[str, str] = {
    "coastal": "A", "aerosol": "A", "coastalaerosol": "A", "ultrablue": "A", "a": "A",
    "blue": "B", "b": "B", "green": "G", "g": "G", "red": "R", "r": "R", "yellow": "Y",
    "rededge1": "RE1", "re1": "RE1", "vre1": "RE1", "vegetationrededge1": "RE1",
    "rededge2": "RE2", "re2": "RE2", "vre2": "RE2", "vegetationrededge2": "RE2",
    "rededge3": "RE3", "re3": "RE3", "vre3": "RE3", "vegetationrededge3": "RE3",
    "nir": "N", "n": "N", "nearinfrared": "N", "nirbroad": "N", "broadnir": "N",
    "nir08": "N2", "nirnarrow": "N2", "narrownir": "N2", "n2": "N2", "nir2": "N2",
    "watervapour": "WV", "watervapor": "WV", "wv": "WV", "nir09": "WV",
    "swir1": "S1", "s1": "S1", "swir16": "S1", "shortwaveinfrared1": "S1",
    "swir2": "S2", "s2": "S2", "swir22": "S2", "shortwaveinfrared2": "S2",
}  # fmt: skip
_WAVELENGTH = re.compile(r"^(\d+(?:\.\d+)?)\s*(nm|um|µm|micron|microns)?$")


def _sensor_bands(sensor: str) -> dict[str, tuple[str, float, float]]:
    """spyndex symbol -> (the sensor's band name, centre and bandwidth in nm)."""
    import spyndex

    out = {}
    for symbol in spyndex.bands:
        info = getattr(spyndex.bands[symbol], sensor, None)
        if info is not None:
            out[symbol] = (canonical_band(info.band), float(info.wavelength),
                           float(info.bandwidth))  # fmt: skip
    return out


def sensor_band_codes(sensor: str) -> list[str]:
    """The band codes spyndex knows for ``sensor`` (``B1``, ..., ``B12``, ``B8A``).

    Raises:
        ValueError: spyndex has no band metadata for ``sensor``.
    """
    table = _sensor_bands(sensor)
    if not table:
        raise ValueError(f"spyndex has no band metadata for sensor {sensor!r}")
    return sorted({band for band, _, _ in table.values()})


#: spyndex symbols of bands that are not reflectance (thermal emission).
_NOT_REFLECTANCE = {"T", "T1", "T2"}


def reflectance_bands(bands: Sequence[str], sensor: str = "sentinel2a") -> list[str]:
    """The bands of ``bands`` that spyndex knows as reflectance bands of ``sensor`` (optical;
    not thermal, not SAR or elevation)."""
    table = _sensor_bands(sensor)
    codes = {band for symbol, (band, _, _) in table.items() if symbol not in _NOT_REFLECTANCE}
    return [b for b in bands if canonical_band(b) in codes]


def resolve_band_name(name: str, sensor: str = "sentinel2a") -> str | None:
    """The framework's name (the sensor's band code, e.g. ``B8A``) of a band named ``name``.

    ``name`` may be the code itself (``B08``, ``b8a``), a common name (``Blue``, ``NIR``,
    ``NIR Narrow``, ``SWIR 1``, ``swir16``, ``Red Edge 2``, spyndex's symbols and common names),
    or a centre wavelength (``842 nm``, ``0.842 um``), looked up in spyndex's band metadata for
    ``sensor``. ``NIR`` is the sensor's broad NIR band, or its narrow one where it has only that
    (Landsat 8/9). Returns None when ``name`` is none of these for ``sensor``.
    """
    table = _sensor_bands(sensor)
    codes = {band for band, _, _ in table.values()}
    canon = canonical_band(name)
    if canon in codes:
        return canon
    key = re.sub(r"[^a-z0-9]", "", str(name).lower())
    symbol = _BAND_ALIASES.get(key)
    if symbol == "N" and "N" not in table:
        symbol = "N2"
    if symbol is not None:
        return table[symbol][0] if symbol in table else None
    match = _WAVELENGTH.match(str(name).strip().lower())
    if match:
        value = float(match[1])
        nm = value * 1000 if (match[2] or "nm") != "nm" or value < 20 else value
        inside = [
            (width, band) for band, centre, width in table.values() if abs(nm - centre) <= width / 2
        ]
        return min(inside)[1] if inside else None
    return None


def band_code(name: str, sensor: str = "sentinel2a") -> str:
    """Band-name resolution, the one rule: the sensor's code of a band named ``name``
    (:func:`resolve_band_name`: a code, common name or wavelength), else ``name`` spelt
    canonically (``VV``, ``DEM``, ``B02`` -> ``B2``: bands spyndex does not know keep their name)."""
    return resolve_band_name(name, sensor) or canonical_band(name)


#: How far (nm) a band's centre may lie outside another band's width and still stand in for it.
CROSS_SENSOR_TOLERANCE_NM = 30.0


def map_bands(
    trained: Sequence[str],
    trained_sensor: str,
    given: Sequence[str],
    given_sensor: str,
    tolerance_nm: float = CROSS_SENSOR_TOLERANCE_NM,
) -> list[tuple[str, str, float | None, float | None]]:
    """Which band of another sensor stands in for each band a model was trained on.

    A given band takes the place of a trained one when spyndex gives both the same band symbol
    (``N2``: Sentinel-2's B8A and Landsat 8's B5); otherwise the given band whose centre lies
    within the trained band's width (centre ± half the bandwidth, widened by ``tolerance_nm``),
    the nearest if several (Landsat 8's B5 at 865 nm for Sentinel-2's broad NIR B8, 780-886 nm).
    Bands spyndex does not know (SAR, elevation) must be present under the same name.

    Returns:
        ``(trained band, given band, trained centre nm, given centre nm)`` per trained band, in
        the trained order (centres None for bands spyndex does not know).

    Raises:
        ValueError: naming every trained band without a counterpart, with its wavelength.
    """
    t_table, g_table = _sensor_bands(trained_sensor), _sensor_bands(given_sensor)
    t_symbol = {band: sym for sym, (band, _, _) in t_table.items()}
    g_by_symbol = {sym: band for sym, (band, _, _) in g_table.items()}
    given_canon = [canonical_band(b) for b in given]
    out, missing = [], []
    for band in trained:
        canon = canonical_band(band)
        symbol = t_symbol.get(canon)
        if symbol is None:  # not an optical band spyndex knows: the same name, or nothing
            if canon in given_canon:
                out.append((band, given[given_canon.index(canon)], None, None))
            else:
                missing.append(f"{band} (no wavelength known: needs a band named {band})")
            continue
        _, centre, width = t_table[symbol]
        match = g_by_symbol.get(symbol)
        if match is None or match not in given_canon:
            near = [
                (abs(g_centre - centre), g_band)
                for g_band, g_centre, _ in g_table.values()
                if g_band in given_canon and abs(g_centre - centre) <= width / 2 + tolerance_nm
            ]
            match = min(near)[1] if near else None
        if match is None:
            missing.append(f"{band} ({centre:.0f} nm, {width:.0f} nm wide)")
            continue
        g_centre = next(c for b, c, _ in g_table.values() if b == match)
        out.append((band, given[given_canon.index(match)], centre, g_centre))
    if missing:
        raise ValueError(
            f"the model was trained on {trained_sensor} bands {list(trained)}; the "
            f"{given_sensor} bands {list(given)} have no counterpart for {', '.join(missing)} "
            f"(same spyndex band, or a centre within the band's width + {tolerance_nm:g} nm). "
            "Use data with those bands, or a model trained without them"
        )
    return out


def band_differences(trained: list[str], given: list[str]) -> list[str]:
    """What differs between the bands a model was trained on and the bands it is given, by
    name: missing and extra bands, or the same bands in another order (empty if equal)."""
    a, b = [canonical_band(x) for x in trained], [canonical_band(x) for x in given]
    if a == b:
        return []
    missing, extra = [x for x in a if x not in b], [x for x in b if x not in a]
    out = []
    if missing:
        out.append(f"bands {missing} are missing (trained on {trained}, given {given})")
    if extra:
        out.append(f"bands {extra} were not in training (trained on {trained}, given {given})")
    if not missing and not extra:
        moved = [f"{x} at {b.index(x)} instead of {i}" for i, x in enumerate(a) if b.index(x) != i]
        out.append(
            f"bands reordered: {', '.join(moved)} (trained on {trained}, given {given}); give "
            "the bands in the training order"
        )
    return out


@dataclass(frozen=True)
class DataSpec:
    """The facts about the input data that encoders and tuners need, validated once.

    Args:
        bands: channel names of the model input, in channel order (e.g. ``["B2", "B3", "B4"]``).
        mean, std: per-band statistics of the normalisation ``(x - mean) / std`` the data
            pipeline applies, keyed by band name, in file units. Both ``None`` when the model is
            fed unnormalised values (then mean 0, std 1).
        reflectance_scale: the stored value of reflectance 1.0 (1 for float reflectance, 10000
            for integer L1C/L2A products); spectral indices need reflectance in [0, 1].
        nodata: the file value meaning "no data" (e.g. -9999), or ``None``.
        sensor: spyndex sensor whose band table and wavelengths apply (``sentinel2a``, ...).
        gsd: ground sample distance in metres, when known (datasets may also give it per sample).
        classes: class names (empty for a model without a segmentation head).
        targets: names of the pixel-wise regression targets, one output channel each in this
            order (empty for a model without a regression head), e.g. ``("ndvi",)``.
        ignore_index: label of pixels that carry no class; outside ``[0, len(classes))``.
        display_bands: three bands (red, green, blue) for pictures; default B4, B3, B2 when
            present, else the first three bands.

    Raises:
        ValueError: naming the bad band, value or key and how to fix it.
    """

    bands: tuple[str, ...]
    mean: Mapping[str, float] | None = None
    std: Mapping[str, float] | None = None
    reflectance_scale: float = 1.0
    nodata: float | None = None
    sensor: str = "sentinel2a"
    gsd: float | None = None
    classes: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    ignore_index: int = -1
    display_bands: tuple[str, ...] | None = field(default=None)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise the fields once, here
        bands = tuple(str(b) for b in self.bands) if not isinstance(self.bands, str) else ()
        if not bands:
            raise ValueError(
                f"DataSpec.bands must be a non-empty list of band names, got {self.bands!r}"
            )
        canon = [canonical_band(b) for b in bands]
        repeated = sorted({b for b, c in zip(bands, canon) if canon.count(c) > 1})
        if repeated:
            raise ValueError(f"bands {list(bands)} name the same band twice: {repeated}")
        set_(self, "bands", bands)
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both band mean and std (or neither, for unnormalised data)")
        if self.mean is not None:
            for what in ("mean", "std"):
                table = getattr(self, what)
                if not isinstance(table, Mapping):
                    raise ValueError(
                        f"band {what} must map band name -> value, got {type(table).__name__}; "
                        f"e.g. {{{bands[0]}: 0.1, ...}}"
                    )
                missing = [b for b in bands if b not in table]
                if missing:
                    raise ValueError(
                        f"band {what} lacks bands {missing}; give dataset.band_stats.{what} a "
                        f"value for each of {list(bands)}"
                    )
                values = {b: float(table[b]) for b in bands}
                bad = {b: v for b, v in values.items() if not math.isfinite(v)}
                if bad:
                    raise ValueError(f"band {what} is not finite for {bad}; fix the statistics")
                set_(self, what, values)
            bad_std = {b: s for b, s in self.std.items() if not s > 0}
            if bad_std:
                raise ValueError(
                    f"band std must be > 0 (it divides the image), got {bad_std}; fix "
                    "dataset.band_stats.std"
                )
        scale = float(self.reflectance_scale)
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(
                f"reflectance_scale must be > 0, got {self.reflectance_scale} (10000 for integer "
                "reflectance products, 1 for float reflectance)"
            )
        set_(self, "reflectance_scale", scale)
        if self.nodata is not None:
            if not math.isfinite(float(self.nodata)):
                raise ValueError(
                    f"nodata must be a finite number or null (NaN is always invalid), got {self.nodata}"
                )
            set_(self, "nodata", float(self.nodata))
        if self.gsd is not None:
            if not float(self.gsd) > 0:
                raise ValueError(f"gsd must be > 0 metres or null, got {self.gsd}")
            set_(self, "gsd", float(self.gsd))
        set_(self, "sensor", str(self.sensor))
        classes = tuple(str(c) for c in self.classes)
        set_(self, "classes", classes)
        targets = tuple(str(t) for t in self.targets) if not isinstance(self.targets, str) else ()
        if isinstance(self.targets, str) or len(set(targets)) != len(targets):
            raise ValueError(
                f"targets {self.targets!r} must be a list of distinct target names, e.g. [ndvi]"
            )
        set_(self, "targets", targets)
        set_(self, "ignore_index", int(self.ignore_index))
        if 0 <= self.ignore_index < len(classes):
            raise ValueError(
                f"ignore_index={self.ignore_index} is the id of class "
                f"{classes[self.ignore_index]!r}; set dataset.ignore_index outside "
                f"0..{len(classes) - 1}, e.g. -1"
            )
        display = self.display_bands
        if display is None:
            default = [b for b in RGB_BANDS if b in bands]
            display = tuple(default) if len(default) == 3 else bands[:3]
        display = tuple(str(b) for b in display)
        unknown = [b for b in display if b not in bands]
        if unknown or not 1 <= len(display) <= 3:
            raise ValueError(
                f"display_bands {list(display)} must be 1 to 3 of the bands {list(bands)}"
                + (f"; {unknown} are not among them" if unknown else "")
            )
        set_(self, "display_bands", display)

    # ---- lookups -------------------------------------------------------------------------------
    @property
    def num_bands(self) -> int:
        """Number of input channels."""
        return len(self.bands)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    def mean_list(self) -> list[float]:
        """Per-band mean in band order (0 for unnormalised data)."""
        return [self.mean[b] for b in self.bands] if self.mean else [0.0] * self.num_bands

    def std_list(self) -> list[float]:
        """Per-band std in band order (1 for unnormalised data)."""
        return [self.std[b] for b in self.bands] if self.std else [1.0] * self.num_bands

    def index_of(self, names: Sequence[str], needed_for: str) -> list[int]:
        """Channel indices of ``names`` (matched by canonical band name), in that order.

        Raises:
            ValueError: names missing from :attr:`bands`, and what needed them.
        """
        canon = [canonical_band(b) for b in self.bands]
        missing = [n for n in names if canonical_band(n) not in canon]
        if missing:
            raise ValueError(
                f"the data bands {list(self.bands)} lack {missing}, needed for {needed_for}; add "
                "them to dataset.bands (or pick an encoder whose pretrained bands you have)"
            )
        return [canon.index(canonical_band(n)) for n in names]

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the band manifest saved with checkpoints and adapters)."""
        out = asdict(self)
        for key in ("bands", "classes", "targets", "display_bands"):
            out[key] = list(out[key])
        for key in ("mean", "std"):
            out[key] = dict(out[key]) if out[key] is not None else None
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataSpec:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: unknown keys.
        """
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"DataSpec got unknown keys {unknown}; known: {sorted(names)}")
        return cls(**dict(data))

    def differences(self, other: DataSpec) -> list[str]:
        """Human-readable differences that would change what the model sees (bands, statistics,
        scale, no-data, sensor); empty when ``other`` feeds a model the same way."""
        out = []
        if [canonical_band(b) for b in self.bands] != [canonical_band(b) for b in other.bands]:
            return band_differences(list(self.bands), list(other.bands))
        pairs = {
            "mean": (self.mean_list(), other.mean_list()),
            "std": (self.std_list(), other.std_list()),
        }
        for key, (a, b) in pairs.items():
            diff = [
                f"{band}: {x} != {y}"
                for band, x, y in zip(self.bands, a, b)
                if not math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)
            ]
            if diff:
                out.append(f"band {key} differs ({', '.join(diff)})")
        for key in ("reflectance_scale", "nodata", "sensor"):
            if getattr(self, key) != getattr(other, key):
                out.append(f"{key} {getattr(self, key)!r} != {getattr(other, key)!r}")
        return out
