"""Visual search for a product catalogue: code shared by training, indexing and the TorchServe handler."""

ARCHIVE_FORMAT_VERSION = 1
EMBEDDING_DIM = 2048
