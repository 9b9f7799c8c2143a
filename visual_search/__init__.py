"""Visual search for a product catalogue: code shared by training, indexing and the TorchServe handler."""

ARCHIVE_FORMAT_VERSION = 2  # 2: the catalogue is a folder (catalogue_store), bundled or outside
EMBEDDING_DIM = 2048
