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
import logging
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

import spyndex
import torch

from deflect.data import canonical_band

log = logging.getLogger(__name__)

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

#: Wavelength constants of spyndex and the band symbol whose centre wavelength they take.
WAVELENGTH_CONSTANTS: dict[str, str] = {
    "lambdaG": "G",
    "lambdaN": "N",
    "lambdaN2": "N2",
    "lambdaR": "R",
    "lambdaS1": "S1",
    "lambdaS2": "S2",
}


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


INDEX_CHOICES: tuple[str, ...] = ("default", "auto")


def check_index_names(indices: list[str] | tuple[str, ...] | str) -> None:
    """Check the ``indices`` option without the data: ``default``, ``auto`` or known names.

    Raises:
        ValueError: another string, a repeated name, or an unknown name (with close matches).
    """
    if isinstance(indices, str):
        if indices not in INDEX_CHOICES:
            raise ValueError(
                f"indices must be a list of spyndex names, 'default' or 'auto', got {indices!r}"
            )
        return
    names = list(indices)
    if len(set(names)) != len(names):
        raise ValueError(f"indices {names} repeat a name")
    all_names = list(spyndex.indices)
    for name in names:
        if name not in spyndex.indices:
            close = difflib.get_close_matches(name, all_names, n=5)
            hint = f"; did you mean {close}?" if close else ""
            raise ValueError(f"unknown spyndex index {name!r}{hint}")


def index_symbols(name: str) -> set[str]:
    """The symbols (bands and constants) of spyndex index ``name``'s formula."""
    return _formula_names(spyndex.indices[name].formula)


def available_symbols(
    bands: list[str], sensor: str = "sentinel2a", nir_from_b8a: bool = False
) -> set[str]:
    """Symbols an index may use with ``bands``: their spyndex band symbols, the constants with a
    default value, and the wavelength constants of the bands present."""
    return (
        set(band_symbols(bands, sensor, nir_from_b8a))
        | set(_default_constants())
        | set(wavelength_constants(bands, sensor, nir_from_b8a))
    )


def resolve_indices(
    indices: list[str] | tuple[str, ...] | str,
    bands: list[str],
    sensor: str = "sentinel2a",
    nir_from_b8a: bool = False,
) -> list[str]:
    """Expand the ``indices`` option into the list of spyndex index names for ``bands``.

    * ``"auto"``: every spyndex index whose symbols are all available (bands present, constants
      with a default, wavelengths of present bands), with no filter by application domain;
    * ``"default"``: the curated :data:`DEFAULT_INDICES` that are computable, in that order (the
      ones left out are logged with the band they lack);
    * a list: those indices, each of which must be computable.

    Raises:
        ValueError: an unknown index name (with close matches), or a listed index needing a band
            that is not in ``bands`` (naming the index, the spyndex symbol and the sensor band).
    """
    check_index_names(indices)
    available = available_symbols(bands, sensor, nir_from_b8a)
    if indices == "auto":
        return sorted(n for n in spyndex.indices if index_symbols(n) <= available)
    if indices == "default":
        chosen = [n for n in DEFAULT_INDICES if index_symbols(n) <= available]
        left_out = {
            n: sorted(index_symbols(n) - available) for n in DEFAULT_INDICES if n not in chosen
        }
        if left_out:
            log.info(
                "DEFLECT default indices: %s; left out for lack of bands: %s",
                chosen,
                ", ".join(f"{n} (needs {'/'.join(s)})" for n, s in left_out.items()),
            )
        return chosen
    table = {v: k for k, v in sensor_band_table(sensor).items()}
    names = list(indices)
    for name in names:
        missing = sorted(index_symbols(name) - available)
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
        #: input channels each index reads, in ``names`` order
        self.channels = [
            sorted({self.symbols[s] for s in index_symbols(n) if s in self.symbols})
            for n in self.names
        ]

    def validity(self, valid: torch.Tensor) -> torch.Tensor:
        """Where each index is defined ``(B, K, ...)``: all the bands it reads are valid there
        (``valid``: ``(B, C, ...)`` booleans)."""
        out = [
            valid[:, ch].all(dim=1) if ch else torch.ones_like(valid[:, 0]) for ch in self.channels
        ]
        if not out:
            return valid.new_zeros(valid.shape[0], 0, *valid.shape[2:])
        return torch.stack(out, dim=1)

    def forward(self, reflectance: torch.Tensor) -> torch.Tensor:
        """Indices ``(B, K, ...)`` from reflectance ``(B, C, ...)`` in [0, 1] (any trailing
        spatial or temporal axes)."""
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
            return torch.stack(out, dim=1)  # (B, K, ...)

    def extra_repr(self) -> str:
        return f"indices={self.names}, clamp={self.clamp}"
