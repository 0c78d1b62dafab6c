"""Reading the python pickles datasets are shared as, without letting them run code.

A pickle can name any function to call while it loads; these admit numpy
arrays, their dtypes and plain containers only, so a tampered file is an
error, not an exploit.
"""

import io
import pickle
from pathlib import Path

import numpy as np

from metalearn.errors import MetalearnError

# numpy 1 and 2 module names; _codecs.encode: bytes as a protocol-2 pickle written by Python 3 spells them;
# _frombuffer: an array in a protocol-5 pickle (Python 3.14's default).
ALLOWED = {
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a dataset file")
        return super().find_class(module, name)


def load_arrays(data: bytes, encoding: str = "ASCII"):
    """The pickled content of `data` (encoding="bytes" for Python 2 pickles such as CIFAR's)."""
    return _ArraysOnly(io.BytesIO(data), encoding=encoding).load()


class PickleFile:
    """A dataset's pickle and what it should hold; each way it falls short is one MetalearnError naming it."""

    def __init__(self, path: Path, what: str, fix: str, encoding: str = "ASCII"):
        self.path, self.what, self.fix, self.encoding = path, what, fix, encoding

    def error(self, problem: str) -> MetalearnError:
        return MetalearnError(f"{self.path} is not {self.what}: {problem}; {self.fix}.")

    def read(self):
        """The file's content (its other errors, such as a missing file, are the caller's)."""
        data = self.path.read_bytes()
        try:
            return load_arrays(data, self.encoding)
        except Exception as err:  # the opcodes are the file's: any failure while they run means a damaged file
            raise MetalearnError(f"{self.path} is not {self.what} ({type(err).__name__}: {err}): {self.fix}.") from None

    def entry(self, content, key: str):
        """content[key] of a pickled dict, by a bytes or str key (Python 2 pickles read with encoding="bytes"
        have bytes keys)."""
        if not isinstance(content, dict):
            raise self.error(f"it holds {describe(content)}, not a dict")
        for candidate in (key.encode(), key):
            if candidate in content:
                return content[candidate]
        raise self.error(f"it has no '{key}' entry")

    def uint8_array(self, value, name: str, shape: str, fits) -> np.ndarray:
        """`value` when it is a uint8 array that `fits(array)`; `shape` describes such an array."""
        if not isinstance(value, np.ndarray) or value.dtype != np.uint8 or not fits(value):
            raise self.error(f"{name} is {describe(value)}, not a uint8 array {shape}")
        return value

    def index_list(self, value, name: str, below: int) -> list[int]:
        """A list or 1-D array of integers 0 <= i < `below`, as a list."""
        if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iu":
            found = value.tolist()
        elif isinstance(value, (list, tuple)) and all(type(i) is int or isinstance(i, np.integer) for i in value):
            found = [int(i) for i in value]
        else:
            raise self.error(f"{name} is {describe(value)}, not a list of integers")
        outside = [i for i in found if not 0 <= i < below]
        if outside:
            raise self.error(f"{name} holds {outside[0]}, outside 0..{below - 1}")
        return found


def describe(value) -> str:
    """What a value read from a pickle is, for a message: 'a list', 'a uint8 array [3, 84]'."""
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array {list(value.shape)}"
    return f"a {type(value).__name__}"
