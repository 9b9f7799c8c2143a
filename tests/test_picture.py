"""The results picture is a real image with one row per query and the query beside its neighbours."""
from PIL import Image

from training.plot import draw_results
from visual_search.items import scan_folder


def test_results_picture_shows_queries_beside_their_neighbours(photo_dir, tmp_path):
    items = scan_folder(photo_dir)
    answer = {"category": "bags", "confidence": 0.9,
              "neighbours": [{"id": it.id, "category": it.category, "distance": 0.1 * i, "image": it.image}
                             for i, it in enumerate(items[:4])]}
    rows = [(photo_dir / items[0].image, "bags", answer), (photo_dir / items[9].image, "phones", answer)]
    out = draw_results(rows, photo_dir, tmp_path / "results.png")
    with Image.open(out) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert width > height  # 5 panels across, 2 rows down
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 100  # photos, not a blank canvas
