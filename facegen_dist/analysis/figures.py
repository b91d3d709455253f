"""The study's five figures, one per view, runs side by side (matplotlib, Agg canvas: no display, no pyplot state).

Each study is {"title": "run (VAE) · 64,000 images · EMA", "numbers": ..., "pictures": ...} as made by
latent.study_run; every panel is titled with its run so a figure can be read on its own.
"""

from __future__ import annotations

import os
import textwrap
from collections import Counter
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torchvision.utils import make_grid

PAD = 2  # pixels between images in a grid
MAX_LEGEND = 10  # attribute values drawn in their own colour; the rest are grey "other"
CELL_INCHES = 0.8


def _wrap(text: str, inches: float, fontsize: float) -> str:
    """Break each line of `text` to fit `inches` (a character is about 0.55 em wide): titles must not run off the figure."""
    width = max(20, int(inches * 72 / (0.55 * fontsize)))
    return "\n".join(textwrap.fill(line, width) for line in text.split("\n"))


def _number(value: float | None) -> str:
    return "n/a (singular fit)" if value is None else f"{value:.3g}"


def _fit_kl(numbers: dict) -> str:
    """The full Gaussian fit's KL, or why there is none, and the diagonal fit's."""
    full = numbers["kl_gaussian_fit"]
    diagonal = numbers["kl_diagonal_gaussian_fit"]
    text = f"{full:.3g}" if full is not None else "n/a, " + numbers["kl_gaussian_fit_note"].split(";")[0]
    return f"{text}; diagonal fit {'n/a (a constant dimension)' if diagonal is None else f'{diagonal:.3g}'}"


def _save(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    figure.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    return path


def _image_panel(ax, cells: torch.Tensor, title: str, col_labels=None, row_labels=None) -> None:
    """cells [rows, cols, 3, H, W] in [0, 1] drawn as one grid, labels centred on its columns/rows."""
    rows, cols, _, height, width = cells.shape
    grid = make_grid(cells.reshape(rows * cols, *cells.shape[2:]), nrow=cols, padding=PAD, pad_value=1.0)
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks(
        [PAD + j * (width + PAD) + width / 2 - 0.5 for j in range(cols)] if col_labels else [],
        col_labels or [],
        fontsize=9,
    )
    ax.set_yticks(
        [PAD + i * (height + PAD) + height / 2 - 0.5 for i in range(rows)] if row_labels else [],
        row_labels or [],
        fontsize=9,
    )
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title, fontsize=10)


def _note_panel(ax, title: str, note: str) -> None:
    """A panel that says in words why a run has no pictures for this view."""
    ax.text(0.5, 0.5, note, ha="center", va="center", fontsize=10, bbox={"facecolor": "0.93", "edgecolor": "0.6"})
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)


def _image_figure(studies: list[dict], heading: str, panel, path: Path) -> Path:
    """One image panel per run, side by side; `panel(study) -> (cells, title line, col labels, row labels)`.

    cells None: the view does not apply to that run, and the title line says why (drawn as a note).
    """
    drawn = [panel(study) for study in studies]
    rows, cols = next((cells.shape[:2] for cells, *_ in drawn if cells is not None), (4, 6))
    panel_inches = max(cols * CELL_INCHES + 1.4, 4.5)
    text_inches = max(cols * CELL_INCHES, 3.6)
    figure = Figure(figsize=(len(studies) * panel_inches, rows * CELL_INCHES + 2.0), layout="constrained")
    figure.suptitle(_wrap(heading, len(studies) * panel_inches, 12), fontsize=12)
    for ax, study, (cells, line, col_labels, row_labels) in zip(
        figure.subplots(1, len(studies), squeeze=False)[0], studies, drawn
    ):
        if cells is None:
            _note_panel(ax, _wrap(study["title"], text_inches, 10), _wrap(line, text_inches - 0.4, 10))
        else:
            _image_panel(ax, cells, _wrap(f"{study['title']}\n{line}", text_inches, 10), col_labels, row_labels)
    return _save(figure, path)


def reconstruction_figure(studies: list[dict], path: Path) -> Path:
    def panel(study):
        inputs, reconstructions = study["pictures"]["reconstruction"]
        per_row = max(1, (inputs.shape[0] + 1) // 2)  # two input/reconstruction row pairs keep the panel near square
        cells, labels = [], []
        for start in range(0, inputs.shape[0], per_row):
            for images, label in ((inputs, "input"), (reconstructions, "reconstruction")):
                row = images[start : start + per_row]
                cells.append(torch.cat([row, torch.ones(per_row - row.shape[0], *row.shape[1:])]))
                labels.append(label)
        numbers = study["numbers"]["reconstruction"]
        line = f"val PSNR {numbers['psnr_mean']:.2f} dB, MSE {numbers['mse_mean']:.5f} (mean of {numbers['num']})"
        return torch.stack(cells), line, None, labels

    return _image_figure(studies, "Reconstruction: validation avatars above their reconstructions", panel, path)


def generation_figure(studies: list[dict], path: Path) -> Path:
    def panel(study):
        samples = study["pictures"]["generation"]
        numbers = study["numbers"]["generation"]
        if samples is None:
            return None, numbers["skipped"], None, None
        side = max(1, int(samples.shape[0] ** 0.5))
        line = (
            f"Mahalanobis distance under the Gaussian fit of the codes ({numbers['codes']}), median:"
            f" prior z {_number(numbers['mahalanobis_prior_median'])}, codes {_number(numbers['mahalanobis_code_median'])}"
        )
        return samples[: side * side].reshape(side, side, *samples.shape[1:]), line, None, None

    return _image_figure(studies, "Generation from the prior: the same z ~ N(0, I) through each decoder", panel, path)


def interpolation_figure(studies: list[dict], path: Path) -> Path:
    def panel(study):
        rows = study["pictures"]["interpolation"]
        numbers = study["numbers"]["interpolation"]
        steps = rows.shape[1]
        labels = [f"{j / (steps - 1):.2g}" for j in range(steps)]
        labels[0], labels[-1] = "recon A", "recon B"
        return rows, f"{numbers['kind']} interpolation between val pairs", labels, None

    return _image_figure(
        studies, "Interpolation: latent paths between two validation avatars (t = 0 ... 1)", panel, path
    )


def attribute_figure(studies: list[dict], path: Path) -> Path:
    def panel(study):
        numbers = study["numbers"]["attribute_vector"]
        labels = [f"{s:+g}" if s else "0 (recon)" for s in numbers["strengths"]]
        line = (
            f"z + s·v, v = mean[{numbers['attr']}={numbers['value']}] − mean[others]"
            f" ({numbers['num_with']} vs {numbers['num_without']}, |v| = {numbers['norm']:.3g})"
        )
        return study["pictures"]["attribute_vector"], line, labels, [f"({v})" for v in numbers["face_values"]]

    return _image_figure(
        studies, "Attribute vector: adding s times the attribute direction to faces without it", panel, path
    )


def _value_colours(studies: list[dict]) -> dict[str, tuple]:
    """The same colour for a value in every panel: the most common values first, the rest grey."""
    from matplotlib import colormaps

    counts = Counter(value for study in studies for value in study["pictures"]["latent_map"]["values"])
    common = sorted(counts, key=lambda value: (-counts[value], value))[:MAX_LEGEND]
    palette = colormaps["tab10"]
    return {value: palette(i) for i, value in enumerate(common)}


def _scatter(
    ax, points: torch.Tensor, values: list[str], colours: dict, title: str, axis_labels: tuple[str, str]
) -> None:
    other = [i for i, value in enumerate(values) if value not in colours]
    if other:
        ax.scatter(points[other, 0], points[other, 1], s=5, color="0.75", label="other", linewidths=0)
    for value, colour in colours.items():
        chosen = [i for i, v in enumerate(values) if v == value]
        if chosen:
            ax.scatter(points[chosen, 0], points[chosen, 1], s=5, color=colour, label=value, linewidths=0)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(axis_labels[0], fontsize=9)
    ax.set_ylabel(axis_labels[1], fontsize=9)
    ax.tick_params(labelsize=8)


def latent_map_figure(studies: list[dict], path: Path) -> Path:
    """PCA (and t-SNE when available) of the val latents coloured by the attribute, and per-dimension spread."""
    colours = _value_colours(studies)
    with_tsne = any(study["pictures"]["latent_map"]["tsne"] is not None for study in studies)
    num_rows = 3 if with_tsne else 2
    width = 5.4 * len(studies) + 1.8  # + the legend on the right
    figure = Figure(figsize=(width, 4.6 * num_rows + 0.8), layout="constrained")
    axes = figure.subplots(num_rows, len(studies), squeeze=False)
    first = studies[0]["numbers"]["latent_map"]
    heading = (
        f"Latent map: {first['knn']['num_train'] + first['knn']['num_test']} val latents coloured by {first['attr']}"
    )
    if not with_tsne:
        heading += f"\n{studies[0]['pictures']['latent_map']['tsne_note']}"
    figure.suptitle(_wrap(heading, width - 2.2, 12), fontsize=12)
    for column, study in enumerate(studies):
        numbers, pictures = study["numbers"]["latent_map"], study["pictures"]["latent_map"]
        knn = numbers["knn"]
        summary = (
            f"{knn['k']}-NN {numbers['attr']} accuracy {knn['accuracy']:.2f} (majority class {knn['majority_baseline']:.2f})\n"
            f"KL(Gaussian fit of q(z) || N(0, I)) = {_fit_kl(numbers)}"
        )
        ratio = numbers["pca_explained_variance_ratio"]
        _scatter(
            axes[0, column],
            pictures["pca"],
            pictures["values"],
            colours,
            _wrap(f"{study['title']}\nPCA of the {numbers['latent']}\n{summary}", 5.2, 10),
            (f"PC1 ({100 * ratio[0]:.1f}% of variance)", f"PC2 ({100 * ratio[1]:.1f}%)"),
        )
        if with_tsne:
            if pictures["tsne"] is not None:
                _scatter(
                    axes[1, column],
                    pictures["tsne"],
                    pictures["values"],
                    colours,
                    _wrap(f"{study['title']}\nt-SNE", 5.2, 10),
                    ("t-SNE 1", "t-SNE 2"),
                )
            else:
                axes[1, column].text(
                    0.5, 0.5, _wrap(pictures["tsne_note"], 4.5, 9), ha="center", va="center", fontsize=9
                )
                axes[1, column].set_axis_off()
        _spread_panel(axes[-1, column], study)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside right center", fontsize=9, markerscale=3, title=first["attr"])
    return _save(figure, path)


def _spread_panel(ax, study: dict) -> None:
    """Sorted per-dimension std and |mean| against the prior's 1 and 0 (log scale: collapsed dimensions show)."""
    numbers = study["numbers"]["latent_map"]
    curves = [("std of the codes", numbers["per_dim_std"], "tab:blue")]
    if "per_dim_aggregate_std" in numbers:
        curves.append(("std of q(z) (codes + posterior noise)", numbers["per_dim_aggregate_std"], "tab:green"))
    curves.append(("|mean|", [abs(m) for m in numbers["per_dim_mean"]], "tab:orange"))
    for label, values, colour in curves:
        ax.plot(torch.tensor(values).sort(descending=True).values.clamp_min(1e-4).numpy(), label=label, color=colour)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="prior N(0, I): std 1")
    ax.set_yscale("log")
    ax.set_xlabel("latent dimension (each curve sorted, largest first)", fontsize=9)
    ax.set_title(
        _wrap(
            f"{study['title']}\nper-dimension spread: {numbers['active_dims']} of {numbers['dim']} dims active (Var of code > 0.01)",
            5.2,
            10,
        ),
        fontsize=10,
    )
    ax.legend(fontsize=8)
    ax.tick_params(labelsize=8)


FIGURES = {
    "reconstruction": reconstruction_figure,
    "latent_map": latent_map_figure,
    "generation": generation_figure,
    "interpolation": interpolation_figure,
    "attribute_vector": attribute_figure,
}


def save_figures(studies: list[dict], out_dir: Path) -> list[Path]:
    """One PNG per view in out_dir (<view>.png), every run side by side."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return [draw(studies, out_dir / f"{view}.png") for view, draw in FIGURES.items()]
