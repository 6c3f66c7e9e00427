"""The generated report: ``report.md`` with PNG plots and ``report.json`` with every figure.

The demo (and benchmarks) add sections as they measure; nothing in the report is typed in by
hand: each table cell and plotted point comes from a value recorded in the JSON next to it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence

from flexcim.errors import FlexCimError
from flexcim.fileio import atomic_path, atomic_paths

log = logging.getLogger("flexcim.report")


def _cell(value) -> str:
    """A table cell: numbers formatted for reading; a ``|`` escaped and line breaks folded, so
    the row keeps its columns."""
    return " ".join(_format(value).replace("|", "\\|").split())


def _format(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:,.3f}".rstrip("0").rstrip(".") if abs(value) < 100 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub-flavoured markdown table; numbers formatted for reading, not re-parsing."""
    for row in rows:
        if len(row) != len(headers):
            raise FlexCimError(
                f"table row has {len(row)} cells but there are {len(headers)} headers: {row!r}"
            )
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def label_overlaps(fig, *, tolerance: float = 1.0) -> list[tuple[str, str]]:
    """The texts of ``fig`` that collide, as pairs of names (empty: a clean figure).

    The figure is drawn once to lay the texts out; two boxes collide when they overlap by more
    than ``tolerance`` pixels in both directions.  Checked: every pair of visible texts (titles,
    axis labels, tick labels, offset texts, annotations, legend and figure texts); every text
    against the plotting area of a panel it does not belong to (a y label running into the
    neighbouring panel); every annotation against the frame of its own panel (it must sit
    inside).  Panels with one plotting area (``twinx``) count as one.
    """
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()

    def key(ax):
        return tuple(ax.bbox.bounds)

    # (text, its panel or None for the figure, the area it must stay inside or None)
    owned: list[tuple] = [(t, None, None) for t in fig.texts]
    if getattr(fig, "_suptitle", None) is not None:
        owned.append((fig._suptitle, None, None))
    for legend in fig.legends:
        owned += [(t, None, None) for t in legend.get_texts()]
    for ax in fig.axes:
        panel = key(ax)
        owned += [(t, panel, None) for t in (ax.title, ax._left_title, ax._right_title)]
        owned += [(t, panel, ax.bbox) for t in ax.texts]
        for axis in (ax.xaxis, ax.yaxis):
            owned += [(axis.label, panel, None), (axis.get_offset_text(), panel, None)]
            low, high = sorted(axis.get_view_interval())
            # ticks outside the view are laid out but not drawn
            owned += [(t, panel, None) for tick in axis.get_major_ticks()
                      if tick.get_visible() and low <= tick.get_loc() <= high
                      for t in (tick.label1, tick.label2)]
        if ax.get_legend() is not None:
            owned += [(t, panel, None) for t in ax.get_legend().get_texts()]
    boxes, seen = [], set()
    for text, panel, inside in owned:
        if id(text) in seen or not text.get_visible() or not text.get_text().strip():
            continue
        seen.add(id(text))
        boxes.append((text.get_text(), text.get_window_extent(renderer), panel, inside))

    def overlap(a, b) -> bool:
        dx = min(a.x1, b.x1) - max(a.x0, b.x0)
        dy = min(a.y1, b.y1) - max(a.y0, b.y0)
        return dx > tolerance and dy > tolerance

    found = []
    for i, (a, box_a, _, _) in enumerate(boxes):
        found += [(a, b) for b, box_b, _, _ in boxes[i + 1:] if overlap(box_a, box_b)]
    areas = {key(ax): (ax.get_title() or f"panel {i}", ax.bbox) for i, ax in enumerate(fig.axes)}
    for name, box, panel, inside in boxes:
        found += [(name, f"plotting area of {title!r}") for k, (title, area) in areas.items()
                  if k != panel and overlap(box, area)]
        if inside is not None and (
                box.x0 < inside.x0 - tolerance or box.x1 > inside.x1 + tolerance
                or box.y0 < inside.y0 - tolerance or box.y1 > inside.y1 + tolerance):
            found.append((name, "the frame of its panel"))
    return found


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (no display needed), imported lazily."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class Report:
    """Collects markdown sections, plots and figures, then writes them into ``out_dir``.

    Members
    -------
    out_dir : str
        Directory of ``report.md``, ``report.json`` and the PNG files.
    data : dict
        Every recorded figure, by section key; written as ``report.json``.
    """

    def __init__(self, out_dir: str, title: str):
        self.out_dir = out_dir
        self.title = title
        self.data: dict = {}
        self._parts: list[str] = []
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as exc:
            raise FlexCimError(f"cannot create the report directory {out_dir!r}: {exc}") from None

    def record(self, key: str, value) -> None:
        """Store ``value`` (JSON-serializable) under ``key`` in report.json."""
        self.data[key] = value

    def section(self, heading: str, *paragraphs: str) -> None:
        self._parts.append(f"## {heading}\n")
        self._parts.extend(p.rstrip() + "\n" for p in paragraphs if p)

    def table(self, headers: Sequence[str], rows: Sequence[Sequence]) -> None:
        self._parts.append(markdown_table(headers, rows) + "\n")

    def text(self, paragraph: str) -> None:
        self._parts.append(paragraph.rstrip() + "\n")

    def plot(self, name: str, fig, caption: str) -> str:
        """Save a matplotlib figure as ``name``.png, close it, and reference it in the report."""
        path = os.path.join(self.out_dir, f"{name}.png")
        overlaps = label_overlaps(fig)
        if overlaps:  # recorded and logged, never fatal: a report with a crowded plot beats none
            self.data.setdefault("plot_label_overlaps", {})[name] = [list(o) for o in overlaps]
            log.warning("plot %s: %d overlapping labels, e.g. %r and %r", name, len(overlaps),
                        *overlaps[0])
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, bbox_inches="tight")
        pyplot().close(fig)
        self._parts.append(f"![{caption}]({name}.png)\n\n*{caption}*\n")
        return path

    def write(self) -> tuple[str, str]:
        """Write report.md and report.json; returns their paths."""
        md = os.path.join(self.out_dir, "report.md")
        js = os.path.join(self.out_dir, "report.json")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        # The two appear together: a report.md never describes another run's report.json.
        with atomic_paths([md, js]) as (md_tmp, js_tmp):
            md_tmp.write_text(f"# {self.title}\n\nGenerated by `flexcim demo` on {stamp}. Every "
                              "figure below is also in `report.json`.\n\n" + "\n".join(self._parts))
            js_tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True,
                                         default=_json_default) + "\n")
        return md, js


def _json_default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"report.json cannot store {type(value).__name__} values: {value!r}")
