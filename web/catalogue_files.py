"""Catalogue images, served from the catalogue folder only.

A reference is a path relative to the folder ("coat/fmnist-train-09615.png"). Anything that could lead out of
it is refused: `..` or hidden segments, absolute paths, backslashes, NUL bytes, and symlinks (of files or of
folders) whose target lies outside. Only image files are served.
"""
from pathlib import Path
from urllib.parse import quote

from visual_search.images import IMAGE_SUFFIXES


def resolve_image(root, reference):
    """The file that `reference` names inside `root`, or None when it is not a catalogue image there."""
    if not reference or "\\" in reference or "\x00" in reference or reference.startswith("/"):
        return None
    parts = reference.split("/")
    if any(part in ("", ".", "..") or part.startswith(".") for part in parts):
        return None
    if Path(parts[-1]).suffix.lower() not in IMAGE_SUFFIXES:
        return None
    try:
        root = Path(root).resolve(strict=True)
        path = root.joinpath(*parts).resolve(strict=True)  # follows every symlink on the way
    except (OSError, RuntimeError, ValueError):
        return None
    if not path.is_relative_to(root) or not path.is_file():
        return None
    return path


def image_url(reference):
    """Where the page loads a neighbour's image: our /images/ route, or the catalogue's own URL."""
    if reference.startswith(("http://", "https://")):
        return reference
    return "/images/" + quote(reference)
