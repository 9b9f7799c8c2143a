"""Every error of the visual-search core: one base class, each error carrying its HTTP status and a metrics label."""


class VisualSearchError(ValueError):
    """`reason` is meant for the client or the operator; `status` is the HTTP status it deserves; `label` is a short
    stable name for the kind of failure (the Reason dimension of the rejection metric)."""
    status = 500
    label = "error"

    def __init__(self, reason="", status=None, label=None):
        super().__init__(reason)
        self.reason = reason
        self.status = self.status if status is None else status
        self.label = self.label if label is None else label


class InputError(VisualSearchError):
    """A request that cannot be answered as sent."""
    status = 400
    label = "bad_request"


class FilterError(InputError):
    """An unknown category, or a filter that matches no item."""
    label = "bad_filter"


class UnknownListingError(InputError, KeyError):
    """Search by listing named an id that is not in the catalogue (a KeyError too: a lookup that failed)."""
    status = 404
    label = "unknown_listing"

    def __str__(self):  # KeyError would quote the message
        return self.reason


class CatalogueError(VisualSearchError):
    """A catalogue folder is missing, incomplete or inconsistent; the message names what differs."""
    label = "catalogue"


class BundleError(VisualSearchError):
    """A bundle or archive is incomplete or inconsistent; the message says what does not match."""
    label = "bundle"


class CatalogueUnavailable(VisualSearchError):
    """The catalogue engine (a Milvus server) did not answer in time; the request may be retried."""
    status = 503
    label = "catalogue_unavailable"
