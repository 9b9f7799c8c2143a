"""The results picture: each query photo beside its nearest catalogue items, with categories and distances."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from visual_search.images import open_image  # noqa: E402


def draw_results(rows, catalogue_root, out_path, title=""):
    """`rows`: [(query_path, query_category, answer)] where answer is the service's similar-items JSON."""
    k = max(len(answer["neighbours"]) for _, _, answer in rows)
    fig, axes = plt.subplots(len(rows), k + 1, figsize=(2.0 * (k + 1), 2.3 * len(rows)), squeeze=False)
    for r, (query_path, query_category, answer) in enumerate(rows):
        panels = [(open_image(query_path), f"QUERY: {query_category}\npredicted {answer['category']} "
                                           f"({answer['confidence']:.0%})", "black")]
        for n in answer["neighbours"]:
            colour = "green" if n["category"] == query_category else "red"
            panels.append((open_image(f"{catalogue_root}/{n['image']}"), f"{n['category']}\nd={n['distance']:.3f}",
                           colour))
        for c, ax in enumerate(axes[r]):
            ax.axis("off")
            if c < len(panels):
                image, label, colour = panels[c]
                ax.imshow(image)
                ax.set_title(label, fontsize=8, color=colour)
        axes[r][0].patch.set_edgecolor("black")
    fig.suptitle(title or "query | top neighbours (green: same category, red: different)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
