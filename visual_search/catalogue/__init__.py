"""A catalogue folder: the FAISS index, the items in SQLite, category bitmaps and the stored vectors, checked by its
manifest. Serving opens and searches it; publish, update and reindex write new folders (loaded only when called)."""
from .manifest import read_manifest
from .search import Hits, Neighbour, SearchRequest
from .store import Catalogue, catalogue_reference, open_catalogue, verify_catalogue

WRITERS = {"publish_catalogue", "update_catalogue", "reindex_catalogue"}


def __getattr__(name):
    """The writers come from visual_search.catalogue.build on first use, so that serving never loads them."""
    if name in WRITERS:
        from . import build
        return getattr(build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Catalogue", "Hits", "Neighbour", "SearchRequest", "catalogue_reference", "open_catalogue",
           "read_manifest", "verify_catalogue", *sorted(WRITERS)]
