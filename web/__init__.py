"""The web front: a page to search the catalogue by photo, beside TorchServe. See docs/web.md."""
