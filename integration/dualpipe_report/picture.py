"""Draws a `Timeline` as the DeepSeek-V3 report draws its schedules: one row per device,
a coloured cell per F, B, W and F&B with its micro-batch number, idle time left white.

The two streams are told apart by shade: light for the first direction (DualPipe) or the
way down (DualPipeV's chunk 0), dark for the other direction or the way back.
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

from plugins.dualpipe.simulator import Durations, Span, Timeline

# (light, dark) per kind of cell
_COLOURS = MappingProxyType({
    "F": ("#f5c26b", "#d9891a"),
    "B": ("#9ad47a", "#4f9a2c"),  # a whole backward
    "Bi": ("#c6e8b0", "#7cbf57"),  # input gradient only (its W comes later)
    "W": ("#9cc9f0", "#3f86c9"),
})


def _dark(timeline: Timeline, rank: int, chunk: int) -> int:
    pipeline = timeline.pipeline
    direction, _ = pipeline.place(rank, chunk)
    return direction if pipeline.directions == 2 else chunk


def _colour(timeline: Timeline, rank: int, op: str, chunk: int) -> str:
    return _COLOURS[op][_dark(timeline, rank, chunk)]


def draw(timeline: Timeline, path: Path, durations: Durations, title: str = "") -> None:
    """Write the picture to `path` (PNG). `durations` sets where an F&B cell's forward
    part ends and its backward part begins (F : B)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    ranks = len(timeline.rows)
    span_all = float(timeline.makespan)
    width = min(24.0, max(8.0, 0.0035 * 100 * sum(len(r) for r in timeline.rows) / ranks))
    fig, ax = plt.subplots(figsize=(width, 0.45 * ranks + 1.3), dpi=80)
    share = float(durations.F) / float(durations.F + durations.B)  # forward part of an F&B
    text = max(4.0, min(8.0, 600.0 / max(1, sum(len(r) for r in timeline.rows) / ranks)))

    def box(x0: float, x1: float, y: int, colour: str, label: str, edge: float = 0.3) -> None:
        ax.add_patch(Rectangle((x0, y - 0.4), x1 - x0, 0.8, facecolor=colour,
                               edgecolor="black", linewidth=edge))
        ax.text((x0 + x1) / 2, y, label, ha="center", va="center", fontsize=text)

    for rank, row in enumerate(timeline.rows):
        for span in row:
            _cell(timeline, rank, span, share, box)
    ax.set_xlim(0, span_all)
    ax.set_ylim(ranks - 0.5, -0.5)
    ax.set_yticks(range(ranks), [f"Device {r}" for r in range(ranks)])
    ax.set_xlabel("time")
    if title:
        ax.set_title(title, fontsize=9)
    second = "direction 1" if timeline.pipeline.directions == 2 else "chunk 1 (way back)"
    first = "direction 0" if timeline.pipeline.directions == 2 else "chunk 0 (way down)"
    legend = [Patch(facecolor=_COLOURS["F"][0], edgecolor="black", label="Forward"),
              Patch(facecolor=_COLOURS["B"][0], edgecolor="black", label="Backward"),
              Patch(facecolor=_COLOURS["Bi"][0], edgecolor="black", label="Backward for input"),
              Patch(facecolor=_COLOURS["W"][0], edgecolor="black", label="Backward for weights"),
              Patch(facecolor="white", edgecolor="black", linewidth=1.5,
                    label="Overlapped F & B (F part | B part)"),
              Patch(facecolor="#dddddd", edgecolor="black", label=f"light: {first}"),
              Patch(facecolor="#777777", edgecolor="black", label=f"dark: {second}")]
    if timeline.pipeline.chunks == 1:
        legend = legend[:4]
    ax.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, -0.35 if ranks < 4 else -0.2),
              ncol=len(legend), fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, format="png", bbox_inches="tight")  # the legend may be wider than the axes
    plt.close(fig)


def _cell(timeline: Timeline, rank: int, span: Span, share: float, box) -> None:
    cell, x0, x1 = span.cell, float(span.start), float(span.end)
    if cell.op == "FB":
        back = cell.backward
        middle = x0 + share * (x1 - x0)
        box(x0, middle, rank, _colour(timeline, rank, "F", cell.chunk), str(cell.microbatch))
        box(middle, x1, rank, _colour(timeline, rank, "B", back.chunk), str(back.microbatch))
        box(x0, x1, rank, "none", "", edge=1.5)  # one border around the pair, as the report
        return
    kind = "Bi" if cell.op == "B" and cell.split else cell.op
    box(x0, x1, rank, _colour(timeline, rank, kind, cell.chunk), str(cell.microbatch))
