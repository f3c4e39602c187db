"""Training curves in the reports: a loss plot per role in a run's report.html, and the page of
one model's curves (loss, learning rate, tokens/s) that a pipeline training task shows.

Both read the curves.jsonl that training writes beside each model (demix.train.curves)."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

from demix.checkpoint import MODEL_KIND
from demix.config import TRAINING_ROLES as ROLES  # in training order
from demix.report.html import page, plt, png, table
from demix.storage import MANIFEST, atomic_write_text
from demix.train.curves import CURVES_FILE, read_curves

# More models than this in one plot: no legend (a training-based search trains one per proxy).
MAX_LEGEND = 12


def find_curves(root: Path) -> dict[str, dict[str, list[dict]]]:
    """{role: {model: curve rows}} of every trained model folder under `root` (a curves.jsonl
    beside a model manifest), roles in training order; checkpoints and temporaries skipped.

    Raises DataError for a curves.jsonl that is not one JSON object per line.
    """
    root = Path(root)
    found: dict[str, dict[str, list[dict]]] = {}
    for path in sorted(root.rglob(CURVES_FILE)):
        folder = path.parent
        if any(part.startswith(".") for part in folder.relative_to(root).parts):
            continue  # a folder being written
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError):
            continue  # not a finished artifact
        if not isinstance(manifest, dict) or manifest.get("kind") != MODEL_KIND:
            continue  # a checkpoint: its model, once written, holds the same rows
        rows = read_curves(folder)
        if not rows:
            continue
        models = found.setdefault(str(manifest.get("role") or "model"), {})
        name = str(manifest.get("name") or folder.name)
        models[name if name not in models else folder.relative_to(root).as_posix()] = rows
    order = {role: i for i, role in enumerate(ROLES)}
    return {role: found[role] for role in sorted(found, key=lambda r: (order.get(r, 99), r))}


def _x(rows: list[dict]) -> tuple[list, str]:
    """Tokens seen along the x axis (steps for rows of an earlier version, without tokens)."""
    if all("tokens" in row for row in rows):
        return [row["tokens"] for row in rows], "tokens seen"
    return [row["step"] for row in rows], "step"


def plot_loss_curves(role: str, models: dict[str, list[dict]]) -> str:
    """The training loss of every model of one role against tokens seen, as base64 PNG."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    label = "step"
    for name, rows in models.items():
        x, label = _x(rows)
        ax.plot(x, [row["loss"] for row in rows], lw=1.2, label=name)
    ax.set_xlabel(label)
    ax.set_ylabel("training loss")
    ax.set_title(f"Training loss: {role} ({len(models)} model{'s' * (len(models) != 1)})")
    if len(models) <= MAX_LEGEND:
        ax.legend(fontsize=8)
    return png(fig)


def curves_section(root: Path) -> list[str]:
    """The report's "Training curves" section: a loss plot per role of the models under `root`
    ([] when none holds curves). Raises DataError for an unreadable curves.jsonl."""
    found = find_curves(root)
    if not found:
        return []
    body = [
        "<h2>Training curves</h2>",
        f"<p>Training loss per role, from each model's {CURVES_FILE}; "
        "<code>tensorboard --logdir RUN</code> shows every curve.</p>",
    ]
    for role, models in found.items():
        plot = plot_loss_curves(role, models)
        body.append(f'<img alt="training loss: {escape(role)}" src="data:image/png;base64,{plot}">')
    return body


def _plot_model(rows: list[dict]) -> str:
    """Loss, learning rate and tokens/s of one model against tokens seen, as base64 PNG."""
    x, label = _x(rows)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, key, title in zip(
        axes,
        ("loss", "lr", "tokens_per_s"),
        ("training loss", "learning rate", "tokens/s"),
        strict=True,
    ):
        points = [
            (xi, row[key]) for xi, row in zip(x, rows, strict=True) if row.get(key) is not None
        ]
        ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.2)
        ax.set_xlabel(label)
        ax.set_title(title)
    fig.tight_layout()
    return png(fig)


def curves_page(folder: Path, title: str) -> str:
    """The HTML page of one model folder's curves: plots and the last logged row.

    Raises DataError for an unreadable curves.jsonl."""
    rows = read_curves(folder)
    body = [f"<h1>{escape(title)}</h1>"]
    if not rows:
        body.append(
            f"<p>No training curves: {escape(CURVES_FILE)} is absent (not trained here).</p>"
        )
        return page(title, body)
    keys = ["step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s"]
    last = rows[-1]
    body += [
        f'<img alt="curves" src="data:image/png;base64,{_plot_model(rows)}">',
        "<h2>Last logged step</h2>",
        table(keys, [[last.get(key, "-") for key in keys]]),
        f"<p>{len(rows)} logged steps; the model folder holds them as {CURVES_FILE} and "
        "as TensorBoard events under tensorboard/.</p>",
    ]
    return page(title, body)


def write_curves_page(folder: Path, out: Path, title: str) -> Path:
    """Write curves_page of a model folder to `out` (a pipeline training task's HTML output).

    Raises DataError for an unreadable curves.jsonl."""
    atomic_write_text(out, curves_page(folder, title))
    return out
