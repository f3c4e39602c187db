"""HTML building blocks of every report: tables, embedded PNG plots and the page around them."""

from __future__ import annotations

import base64
import html
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["grouped_bars", "image", "page", "plt", "png", "table"]


def png(fig) -> str:
    """A matplotlib figure as base64 PNG (the figure is closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def image(fig) -> str:
    """A matplotlib figure as an <img> element with the PNG embedded."""
    return f'<img src="data:image/png;base64,{png(fig)}">'


def _cell(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    """The lines of a Markdown table; floats with 4 decimals."""
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]


def table(header: list[str], rows: list[list]) -> str:
    """An HTML table; floats with 4 decimals, everything else escaped text."""

    def cell(v):
        return html.escape(_cell(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def page(title: str, body: list[str]) -> str:
    """A standalone HTML page of `body` elements."""
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse;"
        "margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{margin:.5em}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{style}</style>"
        f"</head><body>{''.join(body)}</body></html>"
    )


def grouped_bars(groups: list[str], series: dict[str, list[float]], ylabel: str, title: str) -> str:
    """Bars of several series per group, as base64 PNG."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, (label, values) in enumerate(series.items()):
        ax.bar(x + i * width - 0.4 + width / 2, values, width, label=label)
    ax.set_xticks(x, groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return png(fig)
