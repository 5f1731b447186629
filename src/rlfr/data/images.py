"""Images of multimodal examples: what an image cell of a data file may hold, and how it is read.

Contract: ``read_images(value, base_dir) -> tuple[PIL.Image.Image, ...]`` (RGB, pixels loaded), raising
``DataError`` with the reason (the caller adds the file and row). A cell holds one image or a list of them;
each image is

- a path (``str`` or ``os.PathLike``), relative to the data file's directory unless absolute; no URLs (rlfr
  never downloads during a run);
- ``bytes`` of an encoded image (PNG, JPEG, ...);
- a dict with ``bytes`` and/or ``path`` (how Hugging Face ``datasets`` stores its ``Image`` feature in parquet
  files and saved datasets);
- a ``PIL.Image.Image``.

A CSV cell is text: one path, or a JSON list of paths (``["a.png", "b.png"]``). ``None`` or an empty list
means no image. Images are decoded when the data is read, so a missing or corrupt file fails before any model
loads, naming its row.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

from PIL import Image

from rlfr.errors import DataError

IMAGE_FIELDS = ("images", "image")  # the columns data.image_field=auto looks for, in this order


def _open(data: bytes | Path, what: str):
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            return im.convert("RGB")  # decodes now: a truncated file fails here, not during training
    except FileNotFoundError:
        raise DataError(f"image {what} does not exist") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for a bad file; re-raised naming it
        raise DataError(f"image {what} cannot be read ({type(e).__name__}: {e})") from None


def read_image(value: Any, base_dir: Path):
    """One image (see the module docstring) -> an RGB ``PIL.Image.Image``."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, (bytes, bytearray)):
        return _open(bytes(value), f"({len(value)} bytes)")
    if isinstance(value, dict):
        if value.get("bytes"):
            return _open(bytes(value["bytes"]), f"{value.get('path') or ''}({len(value['bytes'])} bytes)")
        if value.get("path"):
            return read_image(value["path"], base_dir)
        raise DataError(f"an image dict needs 'bytes' or 'path', got keys {sorted(value)}")
    if isinstance(value, (str, os.PathLike)):
        text = str(value).strip()
        if not text:
            raise DataError("empty image path")
        if text.startswith(("http://", "https://")):
            raise DataError(f"image {text!r} is a URL; download it and give the local path")
        path = Path(text).expanduser()
        return _open(path if path.is_absolute() else base_dir / path, repr(text))
    raise DataError(f"an image must be a path, bytes, a dict or a PIL image, got {type(value).__name__}")


def read_images(value: Any, base_dir: Path) -> tuple:
    """The images of one cell (one image, a list of images, or a CSV text cell) -> tuple of RGB images."""
    if hasattr(value, "tolist") and not isinstance(value, (bytes, bytearray)):
        value = value.tolist()  # numpy arrays of images from parquet
    if value is None:
        return ()
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(
                f"image cell {value[:60]!r} starts with '[' but is not a JSON list: {e.msg}"
            ) from None
    if isinstance(value, (list, tuple)):
        out = []
        for i, v in enumerate(value):
            try:
                out.append(read_image(v, base_dir))
            except DataError as e:
                raise DataError(f"image {i + 1} of {len(value)}: {e}") from None
        return tuple(out)
    return (read_image(value, base_dir),)
