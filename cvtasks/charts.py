"""The comparison chart: a figure of merit against GFLOPs per image, circle area by parameters, one colour per family.

What `make compare` draws; `cvtasks/commands/compare.py` gathers the points (from run folders or from
published ImageNet figures). One ``Chart`` becomes a PNG (matplotlib), the same chart as an
interactive plotly figure for W&B, and its table as Markdown and JSON beside the PNG.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ChartPoint", "Chart", "family_colours", "draw_png", "plotly_figure", "markdown_table", "write_chart", "log_chart"]

#: the largest circle's area on the PNG, in points²; the others scale with their parameter counts
MAX_AREA_PT2 = 2400.0
#: the largest circle's diameter in the interactive chart, in pixels
MAX_DIAMETER_PX = 60.0


@dataclass(frozen=True)
class ChartPoint:
    """One net on the chart: its figure of merit, its cost per image and its size."""

    label: str  # the name printed beside the circle: the backbone (or the run, where two share one)
    family: str  # the colour
    value: float  # y: top-1 %, test/acc, test/miou, ...
    gflops: float  # x: multiply-adds per image, in billions
    params: int  # the circle's area
    input_size: int  # the image side, in pixels, at which gflops were counted
    quoted: bool = False  # y quoted from a paper (a hollow circle), not read from weights or a run
    source: str = ""  # where the figures come from: a run folder, torchvision's weights, the registry's quote


@dataclass(frozen=True)
class Chart:
    """The points and the words around them: title, axis labels, the metric's column name, notes."""

    title: str
    metric: str  # the y figure's short name, the table's column title
    x_label: str
    y_label: str
    points: tuple[ChartPoint, ...]
    notes: tuple[str, ...] = field(default=())  # printed under the table: what was left out, what "quoted" means


def family_colours(families: list[str]) -> dict[str, str]:
    """One colour per family, the same for the same set of families (tab10; past ten, tab20's strong hues first)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    names = sorted(set(families))
    if len(names) <= 10:
        return {name: to_hex(colormaps["tab10"](i)) for i, name in enumerate(names)}
    # tab20 pairs a strong and a light shade of each hue: the ten strong ones first, then the light ones
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    return {name: to_hex(colormaps["tab20"](order[i % 20])) for i, name in enumerate(names)}


def _log_x(points: tuple[ChartPoint, ...]) -> bool:
    """A logarithmic GFLOPs axis when the costs span more than 20x (AlexNet to ViT-L spans 90x)."""
    costs = [p.gflops for p in points if p.gflops > 0]
    return bool(costs) and max(costs) / min(costs) > 20


def _size_legend_values(largest: int) -> list[int]:
    """Three round parameter counts for the size legend, the largest near the largest net's."""
    values = []
    for fraction in (0.1, 0.35, 1.0):
        v = largest * fraction
        step = 10 ** math.floor(math.log10(v)) if v > 0 else 1
        values.append(int(round(v / step) * step))
    return sorted(set(v for v in values if v > 0))


def _count(n: float) -> str:
    """A parameter count for people: 61.1M, 850K."""
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def draw_png(chart: Chart, path: Path) -> Path:
    """Draw the chart with matplotlib and save it as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # no display: the chart is a file
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator

    points = chart.points
    colours = family_colours([p.family for p in points])
    largest = max((p.params for p in points), default=1) or 1
    area = lambda params: MAX_AREA_PT2 * params / largest  # noqa: E731 - area, not diameter, is proportional
    fig, ax = plt.subplots(figsize=(15, 8.5), dpi=100)
    for quoted in (False, True):  # filled circles: figures read from weights or runs; hollow: quoted
        group = [p for p in points if p.quoted == quoted]
        if group:
            ax.scatter([p.gflops for p in group], [p.value for p in group], s=[area(p.params) for p in group],
                       facecolors="none" if quoted else [colours[p.family] for p in group],
                       edgecolors=[colours[p.family] for p in group], alpha=0.9 if quoted else 0.55,
                       linewidths=1.6 if quoted else 0.8, zorder=2)
    for p in points:
        ax.annotate(p.label, (p.gflops, p.value), xytext=(4, 3), textcoords="offset points", fontsize=7, zorder=3)
    if _log_x(points):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 0.5, 1, 2 rather than 10^0
    ax.set_xlabel(chart.x_label)
    ax.set_ylabel(chart.y_label)
    ax.set_title(chart.title)
    ax.grid(True, alpha=0.3, zorder=0)
    ax.margins(x=0.08, y=0.1)  # the largest circles stay inside the axes
    # both legends outside the axes, on the right: no point is ever hidden behind one
    handles = [ax.scatter([], [], s=area(v), facecolors="lightgrey", edgecolors="grey", label=f"{_count(v)} params")
               for v in _size_legend_values(largest)]
    if any(p.quoted for p in points):
        handles.append(ax.scatter([], [], s=area(largest) * 0.1, facecolors="none", edgecolors="black", linewidths=1.6,
                                  label="hollow: top-1 quoted,\nGFLOPs and params ours"))
    sizes = ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, labelspacing=2.8,
                      handletextpad=2.6, borderpad=1.4, title="circle area: parameters", frameon=False)
    ax.add_artist(sizes)
    family_handles = [Line2D([], [], marker="o", linestyle="", markersize=8, markerfacecolor=colour, markeredgecolor=colour,
                             alpha=0.7, label=family) for family, colour in colours.items()]
    families = ax.legend(handles=family_handles, loc="lower left", bbox_to_anchor=(1.01, 0.0), fontsize=8, title="family",
                         frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight", bbox_extra_artists=[sizes, families])  # the legends outside the axes included
    plt.close(fig)
    return path


def plotly_figure(chart: Chart) -> Any:
    """The same chart as an interactive plotly figure (hover for each net's figures), one trace per family."""
    import plotly.graph_objects as go

    points = chart.points
    colours = family_colours([p.family for p in points])
    largest = max((p.params for p in points), default=1) or 1
    fig = go.Figure()
    for family, colour in colours.items():
        for quoted in (False, True):
            group = [p for p in points if p.family == family and p.quoted == quoted]
            if not group:
                continue
            fig.add_trace(go.Scatter(
                x=[p.gflops for p in group], y=[p.value for p in group], mode="markers+text",
                name=family + (" (quoted)" if quoted else ""), text=[p.label for p in group], textposition="top right",
                textfont={"size": 9},
                marker={"size": [p.params for p in group], "sizemode": "area", "sizeref": 2.0 * largest / MAX_DIAMETER_PX ** 2,
                        "color": colour, "symbol": "circle-open" if quoted else "circle", "opacity": 0.9 if quoted else 0.6,
                        "line": {"width": 2 if quoted else 1, "color": colour}},
                customdata=[[_count(p.params), p.input_size, p.source] for p in group],
                hovertemplate=(f"<b>%{{text}}</b><br>{chart.metric}: %{{y:.4g}}<br>GFLOPs: %{{x:.3g}} at %{{customdata[1]}} px"
                               "<br>params: %{customdata[0]}<br>%{customdata[2]}<extra></extra>"),
            ))
    fig.update_layout(title=chart.title, xaxis_title=chart.x_label, yaxis_title=chart.y_label, legend_title="family",
                      template="plotly_white")
    if _log_x(points):
        fig.update_xaxes(type="log")
    return fig


def markdown_table(chart: Chart) -> str:
    """The chart's points as a Markdown table, best figure first, with the notes under it."""
    header = ["net", "family", chart.metric, "GFLOPs", "params", "input", "source"]
    rows = [[p.label, p.family, f"{p.value:.4g}", f"{p.gflops:.3g}", _count(p.params), f"{p.input_size} px",
             ("quoted: " if p.quoted else "") + p.source]
            for p in sorted(chart.points, key=lambda p: -p.value)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join([f"**{chart.title}**", "", *lines, *([""] + [f"- {n}" for n in chart.notes] if chart.notes else [])])


def write_chart(chart: Chart, png: Path) -> list[Path]:
    """The PNG at ``png`` and, beside it, the table as Markdown (``.md``) and the points as JSON (``.json``)."""
    draw_png(chart, png)
    md = png.with_suffix(".md")
    md.write_text(markdown_table(chart) + "\n")
    data = {"title": chart.title, "metric": chart.metric, "x_label": chart.x_label, "y_label": chart.y_label,
            "points": [asdict(p) for p in chart.points], "notes": list(chart.notes)}
    js = png.with_suffix(".json")
    js.write_text(json.dumps(data, indent=2))
    return [png, md, js]


def log_chart(logger: Any, chart: Chart, png: Path, key: str = "compare") -> bool:
    """Log the chart to ``logger`` if it can show an interactive one (a W&B logger, chosen by type); True if logged."""
    from lightning.pytorch.loggers import WandbLogger

    if not isinstance(logger, WandbLogger):
        return False
    import wandb

    columns = ["net", "family", chart.metric, "gflops", "params", "input_size", "quoted", "source"]
    rows = [[p.label, p.family, p.value, p.gflops, p.params, p.input_size, p.quoted, p.source] for p in chart.points]
    logger.experiment.log({f"{key}/chart": wandb.Plotly(plotly_figure(chart)),
                           f"{key}/table": wandb.Table(columns=columns, data=rows),
                           f"{key}/png": wandb.Image(str(png))})
    return True
