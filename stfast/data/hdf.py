"""Reading pandas HDF files (``.h5``: METR-LA, PEMS-BAY, LargeST) without running code from them.

PyTables unpickles node attributes and object columns when pandas reads them, so a crafted ``.h5``
can run code on load. Before pandas touches a file, every node and attribute is read once with
``pickle.loads`` replaced by an unpickler that admits only what traffic frames contain: NumPy arrays
and dtypes, and pandas' fixed-frequency offsets (a ``DatetimeIndex``'s ``freq``). Anything else, and
any column of pickled Python objects, refuses the file before pandas reads it.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import threading
from pathlib import Path

from .graph import ARRAY_PICKLE_GLOBALS

__all__ = ["H5_HINT", "import_pandas", "read_timestamped_frame", "refuse_code_in_hdf"]

H5_HINT = "reading .h5 files needs pandas and PyTables: pip install stfast[h5]"

# The offsets a regular DatetimeIndex's freq pickles to (Tick subclasses), under the current and the
# pandas < 1.0 module names.
_OFFSET_NAMES = ("Day", "Hour", "Minute", "Second", "Milli", "Micro", "Nano")
_OFFSET_MODULES = ("pandas._libs.tslibs.offsets", "pandas.tseries.offsets")
_scan_lock = threading.Lock()  # the scan swaps pickle.loads process-wide


class _Refused(pickle.UnpicklingError):
    pass


def import_pandas():
    try:
        import pandas
    except ImportError as error:
        raise ImportError(H5_HINT) from error
    return pandas


def _allowed_globals() -> dict:
    from pandas.tseries import offsets

    allowed = dict(ARRAY_PICKLE_GLOBALS)
    for module in _OFFSET_MODULES:
        allowed.update({(module, name): getattr(offsets, name) for name in _OFFSET_NAMES})
    return allowed


def refuse_code_in_hdf(file: Path) -> None:
    """Raise ValueError if reading ``file`` with pandas would unpickle anything but arrays and offsets."""
    import tables

    allowed = _allowed_globals()
    refused: list[str] = []

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) not in allowed:
                refused.append(f"{module}.{name}")
                raise _Refused(f"{module}.{name}")
            return allowed[(module, name)]

    def restricted_loads(data, *, encoding="ASCII", **_):
        return Unpickler(io.BytesIO(data), encoding=encoding).load()

    with _scan_lock, _replaced(pickle, "loads", restricted_loads), tables.open_file(str(file), "r") as h5:
        for node in h5.walk_nodes("/"):
            if isinstance(node, tables.VLArray) and node.atom.kind == "object":
                refused.append(f"pickled Python objects in {node._v_pathname}")
            for name in node._v_attrs._v_attrnames:
                getattr(node._v_attrs, name)  # PyTables swallows unpickling errors: `refused` keeps them
    if refused:
        raise ValueError(f"path: refusing to read {file}: it holds {refused[0]}, and a traffic HDF file holds only "
                         "numbers, strings and timestamps (nothing in it was run)")


@contextlib.contextmanager
def _replaced(owner, name: str, value):
    previous = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, previous)


def read_timestamped_frame(file: Path, what: str = "a DataFrame indexed by timestamps"):
    """The DataFrame of ``file`` (tz-naive DatetimeIndex), checked for code first; clear errors otherwise."""
    pandas = import_pandas()
    try:
        refuse_code_in_hdf(file)
        frame = pandas.read_hdf(file)
    except ImportError as error:
        raise ImportError(H5_HINT) from error
    except (OSError, KeyError, TypeError, RuntimeError) as error:  # PyTables' errors are RuntimeErrors
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = lines[-1] if lines else type(error).__name__  # HDF5 prepends its whole error stack
        raise ValueError(f"path: cannot read {file} as a pandas HDF file ({reason})") from error
    except ValueError as error:
        if str(error).startswith("path: refusing"):
            raise
        raise ValueError(f"path: cannot read {file} as a pandas HDF file ({error})") from error
    if not isinstance(frame, pandas.DataFrame) or not isinstance(frame.index, pandas.DatetimeIndex):
        index_type = type(getattr(frame, "index", None)).__name__
        raise ValueError(f"path: expected {what} in {file}, got {type(frame).__name__} with a {index_type} index")
    return frame.tz_localize(None) if frame.index.tz is not None else frame
