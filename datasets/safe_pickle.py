"""Read GEO-Bench's metadata pickles without ever running what a pickle asks for.

GEO-Bench v1 keeps its metadata as pickles: ``task_specs.pkl`` and, in every sample's HDF5
file, the attribute ``"pickle"`` (``str(pickle.dumps(attr_dict))``). ``pickle.load`` on a file
from the internet runs whatever the file names. :func:`safe_loads` reconstructs only plain data:

* Python's own containers, numbers, strings and bytes (no global needed);
* numpy arrays and scalars whose dtype holds no Python objects (``numpy.dtype``,
  ``numpy.core.multiarray._reconstruct`` and ``scalar``, ``numpy.ndarray``), under numpy's old
  and new module names;
* ``datetime`` dates and times and ``collections.OrderedDict``;
* the classes of ``geobench`` (and of its former name ``ccb``), ``affine.Affine`` and
  ``rasterio.crs.CRS`` become inert :class:`Record` objects: their name and their state, no
  code of theirs runs and the packages need not be installed.

Anything else (``os.system``, ``builtins.eval``, ``subprocess.Popen``, a numpy array of Python
objects, ...) is refused with an error naming the file and the global it asked for.
"""

from __future__ import annotations

import ast
import collections
import datetime
import io
import pickle
from typing import Any

import numpy as np

#: Modules whose classes become inert records (geo-bench's, under its current and former names).
RECORD_MODULES = frozenset({
    "geobench", "geobench.dataset", "geobench.label", "geobench.task", "geobench.io",
    "geobench.io.dataset", "geobench.io.label", "geobench.io.task",
    "ccb", "ccb.io", "ccb.io.dataset", "ccb.io.label", "ccb.io.task",
})  # fmt: skip
#: Other classes a sample's metadata holds that are read as inert records.
RECORD_CLASSES = frozenset({("affine", "Affine"), ("rasterio.crs", "CRS")})
_NUMPY = ("numpy.core.multiarray", "numpy._core.multiarray")
_PLAIN = {
    ("datetime", "date"): datetime.date,
    ("datetime", "datetime"): datetime.datetime,
    ("datetime", "time"): datetime.time,
    ("datetime", "timedelta"): datetime.timedelta,
    ("datetime", "timezone"): datetime.timezone,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class UnsafePickleError(ValueError):
    """A pickle asked for something other than plain data."""


class Record:
    """An inert stand-in for a class of a pickle: its qualified name and its attributes."""

    qualname: str = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_args"] = args
        self.__dict__.update(kwargs)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}  # (dict, slots) as pickle gives them
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state

    def __repr__(self) -> str:
        keys = ", ".join(k for k in self.__dict__ if not k.startswith("_"))
        return f"<{self.qualname} record: {keys}>"


_RECORDS: dict[tuple[str, str], type[Record]] = {}


def _record_class(module: str, name: str) -> type[Record]:
    key = (module, name)
    if key not in _RECORDS:
        _RECORDS[key] = type(name, (Record,), {"qualname": f"{module}.{name}",
                                                "__module__": "datasets.safe_pickle"})  # fmt: skip
    return _RECORDS[key]


def _safe_dtype(*args: Any) -> np.dtype:
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise UnsafePickleError(f"a numpy dtype holding Python objects ({dtype})")
    return dtype


def _safe_reconstruct(cls: Any, *args: Any) -> np.ndarray:
    if cls is not np.ndarray:
        raise UnsafePickleError(f"a numpy array of class {cls!r}")
    return np.ndarray.__new__(np.ndarray, *args)


try:  # numpy >= 2
    from numpy._core.multiarray import scalar as _numpy_scalar
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import scalar as _numpy_scalar


def _safe_scalar(dtype: np.dtype, *args: Any) -> Any:
    if dtype.hasobject:
        raise UnsafePickleError(f"a numpy scalar holding a Python object ({dtype})")
    return _numpy_scalar(dtype, *args)


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module in _NUMPY and name == "_reconstruct":
            return _safe_reconstruct
        if module in _NUMPY and name == "scalar":
            return _safe_scalar
        if module == "numpy" and name == "dtype":
            return _safe_dtype
        if module == "numpy" and name == "ndarray":
            return np.ndarray
        if (module, name) in _PLAIN:
            return _PLAIN[(module, name)]
        if module in RECORD_MODULES or (module, name) in RECORD_CLASSES:
            return _record_class(module, name)
        raise UnsafePickleError(f"it asks for {module}.{name}")


def safe_loads(data: bytes | str, source: str) -> Any:
    """Unpickle ``data`` (bytes, or the ``str(bytes)`` repr GEO-Bench stores in its HDF5
    attribute) allowing plain data only (see the module docstring).

    Raises:
        ValueError: the pickle asks for anything else, or is damaged; names ``source``.
    """
    if isinstance(data, str):
        try:
            data = ast.literal_eval(data)  # the repr of a bytes object, never evaluated as code
        except (ValueError, SyntaxError) as err:
            raise ValueError(
                f"{source}: the metadata is not a pickled bytes string ({err})"
            ) from err
    if not isinstance(data, bytes):
        raise ValueError(f"{source}: the metadata is {type(data).__name__}, not pickled bytes")
    try:
        return _Unpickler(io.BytesIO(data)).load()
    except UnsafePickleError as err:
        raise ValueError(
            f"refused to read {source}: the pickle holds more than plain data ({err}); nothing "
            "of it was run. GEO-Bench metadata never needs this: the file was altered or is not "
            "from GEO-Bench"
        ) from None
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError) as err:
        raise ValueError(f"cannot read {source}: a damaged pickle ({err})") from err
