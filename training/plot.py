"""Pictures: each query photo beside its nearest catalogue items; near-duplicate groups, one row each; precision and
recall of the near-duplicate threshold."""
import io

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from visual_search.fileio import write_atomically  # noqa: E402
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


def save(fig, out_path):
    """Writes a figure as PNG once, atomically, and closes it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_atomically(out_path, buffer.getvalue())
    return out_path


def draw_precision_recall(labelled, record, out_path):
    """Precision and recall against the distance threshold: over all pairs, per category of the listing (its
    precision-recall curve and operating point) and per alteration, with the operating points (`labelled`: a
    training.calibration.LabelledSet; `record`: its calibration record)."""
    from training.calibration import curve  # noqa: PLC0415

    fig, (overall, categories, each) = plt.subplots(1, 3, figsize=(17, 4.8))
    thresholds, precision, recall = curve(labelled.distances, labelled.positive)
    overall.plot(thresholds, precision, label="precision", color="tab:blue")
    overall.plot(thresholds, recall, label="recall", color="tab:orange")
    wide = record["catalogue_wide"]
    if wide["threshold"] is not None:
        overall.axvline(wide["threshold"], color="black", linestyle="--", linewidth=1)
    overall.set_title(f"all pairs, one threshold: {wide['threshold']} gives precision {wide['precision']:.3f}, "
                      f"recall {wide['recall']:.3f}", fontsize=8)
    overall.set_ylabel("precision, recall")
    overall.legend(loc="center left", fontsize=8)
    for name, point in record["categories"].items():
        mine = labelled.category == name
        _, p, r = curve(labelled.distances[mine], labelled.positive[mine])
        line, = categories.plot(r, p, linewidth=1, label=name)
        if point["threshold"] is not None:
            categories.plot([point["recall"]], [point["precision"]], "o", color=line.get_color(), markersize=4)
    categories.axhline(record["target_precision"], color="grey", linestyle=":", linewidth=1)
    categories.plot([record["recall"]], [record["precision"] or 0], "k*", markersize=10,
                    label=f"per-category thresholds: P {record['precision']}, R {record['recall']}")
    categories.set_xlabel("recall")
    categories.set_ylabel("precision")
    categories.set_ylim(0, 1.02)
    categories.set_title(f"per category of the listing; dots: thresholds at precision >= "
                         f"{record['target_precision']}", fontsize=8)
    categories.legend(loc="lower left", fontsize=6, ncol=2)
    for name in record["alterations"]:
        mine = labelled.positive & (labelled.alteration == name)
        d = np.sort(labelled.distances[mine])
        each.plot(d, np.arange(1, len(d) + 1) / len(d), label=f"{name}: {record['alterations'][name]['recall']:.2f}")
    own = [t for t in record["by_category"].values() if t is not None]
    if own:
        each.axvspan(min(own), max(own), color="grey", alpha=0.2, label="per-category thresholds")
    each.set_title("share of copies within a threshold, per alteration (recall at the operating points)", fontsize=8)
    each.set_ylabel("copies within")
    each.legend(loc="upper left", fontsize=6)
    for ax in (overall, each):
        ax.set_xscale("log")
        ax.set_xlabel("threshold: squared L2 distance (log scale)")
    for ax in (overall, categories, each):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save(fig, out_path)


def draw_groups(groups, catalogue_root, out_path, per_row=8, title=""):
    """One row of photos per near-duplicate group: `groups` is [[(id, image reference, distance to the group's
    first listing)]], largest first; photos that cannot be read are shown as blank panels."""
    columns = max(2, min(per_row, max(len(group) for group in groups)))
    fig, axes = plt.subplots(len(groups), columns, figsize=(1.6 * columns, 2.1 * len(groups) + 0.5), squeeze=False)
    for r, group in enumerate(groups):
        for c, ax in enumerate(axes[r]):
            ax.axis("off")
            if c >= len(group):
                continue
            item_id, image, distance = group[c]
            try:
                ax.imshow(open_image(f"{catalogue_root}/{image}"))
            except (OSError, ValueError):
                ax.text(0.5, 0.5, "no image", ha="center", va="center", fontsize=7)
            label = f"{item_id}\n" + ("first" if c == 0 else f"d={distance:.4f}")
            ax.set_title(label, fontsize=6)
        more = len(group) - columns
        axes[r][0].set_title(f"group of {len(group)}" + (f" ({more} not shown)" if more > 0 else "") +
                             f"\n{group[0][0]}\nfirst", fontsize=6)
    fig.suptitle(title or "near-duplicate groups, largest first (d: distance to the group's first listing)",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))  # half an inch kept for the title
    return save(fig, out_path)
