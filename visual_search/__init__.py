"""The visual-search core: what an archive ships. Request-time code (images, preprocessing, model, runtime, request,
bundle) and the catalogue package; nothing here imports training/, serving/, web/ or TorchServe."""

ARCHIVE_FORMAT_VERSION = 2  # 2: the catalogue is a folder (visual_search.catalogue), bundled or outside
EMBEDDING_DIM = 2048
