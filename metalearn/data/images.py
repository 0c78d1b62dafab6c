"""Decoding one image file of a dataset, whatever the file holds.

Image files come from anywhere: a truncated download, a text file named
.png, or a small file that declares a gigantic size to exhaust memory (a
decompression bomb). Each is one MetalearnError naming the file.
"""

import io
import warnings
from pathlib import Path

import torch
from PIL import Image

from metalearn.errors import MetalearnError


def read_image(source: Path | bytes, name: str, mode: str, size: int, resample: int) -> torch.Tensor:
    """The image `source` (a file, or its bytes) converted to `mode` ("L" or "RGB") and resized to size x size:
    uint8 [channels, size, size]. `name` says where it is in messages."""
    try:
        with warnings.catch_warnings():
            # Past PIL's limit a file is refused, not decoded: a warning only lets it through.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
                image = image.convert(mode).resize((size, size), resample)
                data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise MetalearnError(
            f"{name} is refused: it declares more pixels than are decoded safely ({err}). Shrink it to a "
            f"reasonable size or remove it."
        ) from None
    except Exception as err:  # the bytes are the file's: whatever decoding them raises means a damaged file
        raise MetalearnError(
            f"{name} is not a readable image ({type(err).__name__}: {err}): replace or remove it."
        ) from None
    return data.view(size, size, len(mode)).permute(2, 0, 1).contiguous()
