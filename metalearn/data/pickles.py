"""Reading the python pickles datasets are shared as, without letting them run code.

A pickle can name any function to call while it loads; these admit numpy
arrays, their dtypes and plain containers only, so a tampered file is an
error, not an exploit.
"""

import io
import pickle

# numpy 1 and 2 module names; _codecs.encode: bytes as a protocol-2 pickle written by Python 3 spells them.
ALLOWED = {
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
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


# What a damaged or tampered pickle raises while it loads.
PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError)
