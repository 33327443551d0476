"""Spectral indices from ``spyndex``, evaluated in torch on the device.

Part of the Untangled Patch Embedding (UPE) of DEFLECT (Thoreau, Marsocci & Derksen, *Parameter-
Efficient Adaptation of Geospatial Foundation Models through Embedding Deflection*, ICCV 2025,
arXiv:2503.09493): the spectral stream sees spectral indices next to the raw bands.

spyndex formulas are plain Python arithmetic (``+ - * / **`` and unary minus over band symbols,
constants and numbers; checked for all 280 indices of spyndex 0.12). They are parsed once with
:mod:`ast` and evaluated by a small interpreter over torch tensors: nothing is ``eval``-ed, and any
other syntax is rejected. Division by zero gives 0 (spyndex/numpy would give NaN or inf); NaN from a
fractional power of a negative number gives 0; the result is clamped to ``[-clamp, clamp]``.
"""

from __future__ import annotations

import ast
import difflib
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

import spyndex
import torch

#: The curated default list: a few well-known indices per application domain.
DEFAULT_INDICES: tuple[str, ...] = (
    "NDVI",  # vegetation
    "NDWI",  # water
    "MNDWI",  # water
    "NDBI",  # urban
    "NBR",  # burn
    "NDMI",  # vegetation moisture
    "EVI",  # vegetation
    "SAVI",  # vegetation / soil background
    "NDTI",  # water turbidity
    "FAI",  # floating algae (marine debris)
    "FDI",  # floating debris
)

#: Application domains considered by ``indices: auto`` (radar, kernel, snow, clouds are left out:
#: they need non-optical inputs, kernel parameters, or target other problems).
AUTO_DOMAINS: tuple[str, ...] = ("vegetation", "water", "burn", "soil", "urban")

#: Wavelength constants of spyndex and the band symbol whose centre wavelength they take.
WAVELENGTH_CONSTANTS: dict[str, str] = {
    "lambdaG": "G",
    "lambdaN": "N",
    "lambdaN2": "N2",
    "lambdaR": "R",
    "lambdaS1": "S1",
    "lambdaS2": "S2",
}


def canonical_band(name: str) -> str:
    """Canonical Sentinel-2 band name: ``B02`` -> ``B2``, ``b8a`` -> ``B8A``."""
    return re.sub(r"^B0(\d)", r"B\1", name.strip().upper())


def sensor_band_table(sensor: str = "sentinel2a") -> dict[str, str]:
    """Map sensor band names (``B8``) to spyndex symbols (``N``), from spyndex's band metadata."""
    table: dict[str, str] = {}
    for symbol in spyndex.bands:
        info = getattr(spyndex.bands[symbol], sensor, None)
        if info is not None:
            table[canonical_band(info.band)] = symbol
    if not table:
        raise ValueError(f"spyndex has no band metadata for sensor {sensor!r}; try 'sentinel2a'")
    return table


def band_symbols(
    bands: list[str], sensor: str = "sentinel2a", nir_from_b8a: bool = False
) -> dict[str, int]:
    """spyndex symbol -> channel index in ``bands`` for every band spyndex knows.

    With ``nir_from_b8a`` the narrow NIR band B8A also stands in for ``N`` when B8 is absent
    (HLS data has B8A only).
    """
    table = sensor_band_table(sensor)
    symbols: dict[str, int] = {}
    for i, band in enumerate(bands):
        symbol = table.get(canonical_band(band))
        if symbol is not None:
            symbols[symbol] = i
    if nir_from_b8a and "N" not in symbols and "N2" in symbols:
        symbols["N"] = symbols["N2"]
    return symbols


def wavelength_constants(
    bands: list[str], sensor: str = "sentinel2a", nir_from_b8a: bool = False
) -> dict[str, float]:
    """Centre wavelengths (nm) of the bands present, as spyndex's ``lambdaX`` constants.

    When B8A stands in for ``N`` (``nir_from_b8a``), ``lambdaN`` is B8A's wavelength.
    """
    symbols = band_symbols(bands, sensor, nir_from_b8a)
    table = sensor_band_table(sensor)  # band name -> symbol
    out: dict[str, float] = {}
    for const, symbol in WAVELENGTH_CONSTANTS.items():
        if symbol in symbols:
            # the band actually used for the symbol (B8A for N under nir_from_b8a)
            source = table[canonical_band(bands[symbols[symbol]])]
            out[const] = float(getattr(spyndex.bands[source], sensor).wavelength)
    return out


def _default_constants() -> dict[str, float]:
    """spyndex constants that have a default value."""
    out = {}
    for name in spyndex.constants:
        value = spyndex.constants[name].default
        if value is not None:
            out[name] = float(value)
    return out


def _formula_names(formula: str) -> set[str]:
    return {n.id for n in ast.walk(ast.parse(formula, mode="eval")) if isinstance(n, ast.Name)}


def _is_optical_index(name: str) -> bool:
    """True when every symbol of the index is an optical band or a spyndex constant."""
    known = set(spyndex.bands) | set(spyndex.constants)
    return _formula_names(spyndex.indices[name].formula) <= known


def resolve_indices(
    indices: list[str] | tuple[str, ...] | str,
    bands: list[str],
    sensor: str = "sentinel2a",
    nir_from_b8a: bool = False,
) -> list[str]:
    """Check and expand the ``indices`` option into a list of spyndex index names.

    ``"auto"`` gives every index of the :data:`AUTO_DOMAINS` whose bands are all present, whose
    other symbols are constants with a default (or a wavelength of a present band), and that needs
    no non-band input (kernels, radar), sorted by name.

    Raises:
        ValueError: an unknown index name (with close matches), or an index needing a band that is
            not in ``bands`` (naming the index, the spyndex symbol and the sensor band).
    """
    symbols = band_symbols(bands, sensor, nir_from_b8a)
    available = set(symbols) | set(_default_constants())
    available |= set(wavelength_constants(bands, sensor, nir_from_b8a))
    if isinstance(indices, str):
        if indices != "auto":
            raise ValueError(f"indices must be a list of spyndex names or 'auto', got {indices!r}")
        return sorted(
            name
            for name in spyndex.indices
            if spyndex.indices[name].application_domain in AUTO_DOMAINS
            and _is_optical_index(name)
            and _formula_names(spyndex.indices[name].formula) <= available
        )
    names = list(indices)
    if len(set(names)) != len(names):
        raise ValueError(f"indices {names} repeat a name")
    table = {v: k for k, v in sensor_band_table(sensor).items()}
    all_names = list(spyndex.indices)
    for name in names:
        if name not in spyndex.indices:
            close = difflib.get_close_matches(name, all_names, n=5)
            hint = f"; did you mean {close}?" if close else ""
            raise ValueError(f"unknown spyndex index {name!r}{hint}")
        needed = _formula_names(spyndex.indices[name].formula)
        missing = sorted(needed - available)
        if missing:
            described = [
                f"{s} (band {table[s]})" if s in table else s
                for s in missing
                if not s.startswith("lambda")
            ] + [
                f"{s} (wavelength of band {table.get(WAVELENGTH_CONSTANTS[s], '?')})"
                for s in missing
                if s in WAVELENGTH_CONSTANTS
            ]
            raise ValueError(
                f"spectral index {name} ({spyndex.indices[name].formula}) needs spyndex "
                f"symbol(s) {', '.join(described)}, missing from bands {list(bands)}; add the "
                f"band(s) to the dataset bands or drop {name} from indices"
            )
    return names


_BINOPS: dict[type, Callable] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
}

Value = torch.Tensor | float


def _safe_div(a: Value, b: Value) -> Value:
    """``a / b`` with 0 where ``b == 0``."""
    if isinstance(b, torch.Tensor):
        zero = b == 0
        return torch.where(zero, torch.zeros_like(b), a / torch.where(zero, torch.ones_like(b), b))
    if b == 0:
        return a * 0.0 if isinstance(a, torch.Tensor) else 0.0
    return a / b


def _pow(a: Value, b: Value) -> Value:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.pow(a, b)
    try:
        out = a**b
    except ZeroDivisionError:
        return 0.0
    return out if isinstance(out, float | int) else math.nan  # complex -> NaN -> 0 later


@dataclass(frozen=True)
class CompiledIndex:
    """A spyndex index parsed once, evaluated on tensors by :meth:`__call__`."""

    name: str
    formula: str
    tree: ast.Expression

    @classmethod
    def from_spyndex(cls, name: str) -> CompiledIndex:
        """Parse the formula of spyndex index ``name``."""
        formula = spyndex.indices[name].formula
        return cls(name, formula, ast.parse(formula, mode="eval"))

    def __call__(self, env: dict[str, Value]) -> Value:
        """Evaluate with ``env`` mapping symbols to tensors or floats."""
        return self._eval(self.tree.body, env)

    def _eval(self, node: ast.AST, env: dict[str, Value]) -> Value:
        if isinstance(node, ast.BinOp):
            a, b = self._eval(node.left, env), self._eval(node.right, env)
            if isinstance(node.op, ast.Div):
                return _safe_div(a, b)
            if isinstance(node.op, ast.Pow):
                return _pow(a, b)
            op = _BINOPS.get(type(node.op))
            if op is not None:
                return op(a, b)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            value = self._eval(node.operand, env)
            return -value if isinstance(node.op, ast.USub) else value
        elif isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return float(node.value)
        elif isinstance(node, ast.Name):
            return env[node.id]
        raise ValueError(
            f"spectral index {self.name}: unsupported syntax {ast.dump(node)} in {self.formula!r}"
        )


class SpectralIndices(torch.nn.Module):
    """Compute a list of spyndex indices from a batch of reflectances, in fp32.

    Args:
        names: spyndex index names (already checked by :func:`resolve_indices`).
        bands: channel names of the input.
        sensor: spyndex sensor whose band table and wavelengths are used.
        nir_from_b8a: let B8A stand in for N when B8 is absent.
        clamp: output range ``[-clamp, clamp]``; ratio indices blow up where their denominator
            nears 0, and a bounded input keeps the statistics and the LayerNorm well-behaved.
    """

    def __init__(
        self,
        names: list[str],
        bands: list[str],
        sensor: str = "sentinel2a",
        nir_from_b8a: bool = False,
        clamp: float = 10.0,
    ) -> None:
        super().__init__()
        self.names = list(names)
        self.symbols = band_symbols(bands, sensor, nir_from_b8a)
        self.constants = {
            **_default_constants(),
            **wavelength_constants(bands, sensor, nir_from_b8a),
        }
        self.compiled = [CompiledIndex.from_spyndex(n) for n in self.names]
        self.clamp = float(clamp)

    def forward(self, reflectance: torch.Tensor) -> torch.Tensor:
        """Indices ``(B, K, H, W)`` from reflectance ``(B, C, H, W)`` in [0, 1]."""
        with torch.autocast(device_type=reflectance.device.type, enabled=False):
            reflectance = reflectance.float()
            env: dict[str, Value] = dict(self.constants)
            env.update({s: reflectance[:, i] for s, i in self.symbols.items()})  # (B, H, W)
            out = []
            for index in self.compiled:
                value = index(env)
                if not isinstance(value, torch.Tensor):
                    value = reflectance.new_full(reflectance[:, 0].shape, float(value))
                value = torch.nan_to_num(value, nan=0.0, posinf=self.clamp, neginf=-self.clamp)
                out.append(value.clamp(-self.clamp, self.clamp))
            if not out:
                return reflectance.new_zeros(reflectance.shape[0], 0, *reflectance.shape[2:])
            return torch.stack(out, dim=1)  # (B, K, H, W)

    def extra_repr(self) -> str:
        return f"indices={self.names}, clamp={self.clamp}"
