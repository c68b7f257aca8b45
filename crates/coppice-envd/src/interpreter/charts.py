"""Coppice code-interpreter charts: the `e2b/chart` MIME value of a matplotlib figure.

The driver imports this file (by path, never through sys.path) the first time a figure is
formatted.  `figure_to_chart(fig)` returns the dict E2B's code interpreter sends for the
figure: {} for a figure with no data, a chart for one Axes, a "superchart" whose elements
are charts for several.  The shapes, field names and the classification rules follow
E2B's chart extractor exactly, quirks included (see docs/code-interpreter.md); numbers are
plain floats and dates ISO-8601 strings, so the dict is ready for JSON.
"""

import datetime
import re
from decimal import Decimal, localcontext

import matplotlib.dates
from matplotlib.collections import PathCollection
from matplotlib.lines import Line2D
from matplotlib.patches import PathPatch, Rectangle, Wedge
from matplotlib.text import Text

# "Time (s)" and "Amplitude [Hz]" carry units: the text in the brackets.
_UNIT = re.compile(r"\s\((.*?)\)|\[(.*?)\]")
# matplotlib's converter for date axes; its name changed over versions.
_DATE_CONVERTERS = tuple(
    c
    for c in (
        getattr(matplotlib.dates, "_SwitchableDateConverter", None),
        getattr(matplotlib.dates, "DateConverter", None),
        getattr(matplotlib.dates, "ConciseDateConverter", None),
    )
    if isinstance(c, type)
)


def figure_to_chart(fig):
    """The chart dict of a figure; {} when it has no data or cannot be read."""
    try:
        axes = fig.get_axes()
        if not axes or not any(ax.has_data() for ax in axes):
            return {}
        if len(axes) > 1:
            return {
                "type": "superchart",
                "title": _suptitle(fig),
                "elements": [_axes_chart(ax) for ax in axes],
            }
        return _axes_chart(axes[0])
    except Exception:
        # E2B's formatter answers {} for a figure it cannot read; so does this one.
        return {}


def _suptitle(fig):
    getter = getattr(fig, "get_suptitle", None)
    if callable(getter):
        return getter()
    text = getattr(fig, "_suptitle", None)
    return "" if text is None else text.get_text()


def _axes_chart(ax):
    kind = _kind(ax)
    if kind == "line":
        return _line_chart(ax)
    if kind == "scatter":
        return _scatter_chart(ax)
    if kind == "bar":
        return _bar_chart(ax)
    if kind == "pie":
        return _pie_chart(ax)
    if kind == "box_and_whisker":
        return _box_chart(ax)
    return _base(ax, "unknown")


def _kind(ax):
    """Classifies an Axes by the artists on it, in E2B's order of checks."""
    children = getattr(ax, "_children", None)
    if children is None:
        children = ax.get_children()
    artists = [a for a in children if not isinstance(a, Text)]
    if all(isinstance(a, Line2D) for a in artists):
        return "line"
    if all(isinstance(a, (PathPatch, Line2D)) for a in artists):
        return "box_and_whisker"
    artists = [a for a in artists if not (isinstance(a, Line2D) and _is_grid_line(a))]
    if all(isinstance(a, PathCollection) for a in artists):
        return "scatter"
    if all(isinstance(a, Wedge) for a in artists):
        return "pie"
    if all(isinstance(a, Rectangle) for a in artists):
        return "bar"
    return "unknown"


def _is_grid_line(line):
    xs = line.get_xdata()
    ys = line.get_ydata()
    if len(xs) != 2 or len(ys) != 2:
        return False
    return bool(xs[0] == xs[1] or ys[0] == ys[1])


def _base(ax, kind):
    return {"type": kind, "title": ax.get_title() or None, "elements": []}


def _unit(label):
    if not label:
        return None
    match = _UNIT.search(label)
    if match is None:
        return None
    return match.group(1) or match.group(2)


def _base_2d(ax, kind):
    chart = _base(ax, kind)
    x_label = ax.get_xlabel() or None
    y_label = ax.get_ylabel() or None
    chart.update(
        x_label=x_label,
        y_label=y_label,
        x_unit=_unit(x_label),
        y_unit=_unit(y_label),
    )
    return chart


def _swap_axes(chart):
    chart["x_label"], chart["y_label"] = chart["y_label"], chart["x_label"]
    chart["x_unit"], chart["y_unit"] = chart["y_unit"], chart["x_unit"]


def _converter(axis):
    getter = getattr(axis, "get_converter", None)
    if callable(getter):
        return getter()
    return getattr(axis, "converter", None)


def _is_date(converter):
    return bool(_DATE_CONVERTERS) and isinstance(converter, _DATE_CONVERTERS)


def _ticks(converter, ticks):
    if _is_date(converter):
        return [matplotlib.dates.num2date(t).isoformat() for t in ticks]
    ticks = list(ticks)
    if ticks and isinstance(ticks[0], (int, float)):
        return [float(t) for t in ticks]
    return [_plain(t) for t in ticks]


def _scale(converter, scale, ticks, labels):
    if _is_date(converter):
        return "datetime"
    if scale != "linear":
        return scale
    # Ticks at 0, 1, 2… whose labels are not those numbers are categories.
    for i, (tick, label) in enumerate(zip(ticks, labels)):
        if isinstance(tick, (int, float)) and tick == i and str(i) != label:
            continue
        return "linear"
    return "categorical"


def _point_chart(ax, kind):
    chart = _base_2d(ax, kind)
    for name, axis, scale in (
        ("x", ax.xaxis, ax.get_xscale()),
        ("y", ax.yaxis, ax.get_yscale()),
    ):
        labels = [t.get_text() for t in axis.get_ticklabels()]
        converter = _converter(axis)
        ticks = _ticks(converter, axis.get_ticklocs())
        chart[name + "_ticks"] = ticks
        chart[name + "_tick_labels"] = labels
        chart[name + "_scale"] = _scale(converter, scale, ticks, labels)
    return chart


def _point(value):
    """A coordinate as E2B sends it: dates as ISO strings, text as text, else a float."""
    if isinstance(value, datetime.date):
        return value.isoformat()
    kind = type(value).__name__
    if kind == "datetime64":
        return str(value.astype("datetime64[s]"))
    if isinstance(value, str):
        return str(value)
    return float(value)


def _plain(value):
    if isinstance(value, str):
        return str(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _line_chart(ax):
    chart = _point_chart(ax, "line")
    for line in ax.get_lines():
        if _is_grid_line(line):
            continue
        label = line.get_label()
        if label.startswith("_child"):
            label = "Line %d" % int(label[6:])
        points = [[_point(x), _point(y)] for x, y in zip(line.get_xdata(), line.get_ydata())]
        chart["elements"].append({"label": label, "points": points})
    return chart


def _scatter_chart(ax):
    chart = _point_chart(ax, "scatter")
    for collection in ax.collections:
        points = [[_point(x), _point(y)] for x, y in collection.get_offsets()]
        chart["elements"].append({"label": collection.get_label(), "points": points})
    return chart


def _bar_chart(ax):
    chart = _base_2d(ax, "bar")
    for container in ax.containers:
        group = container.get_label()
        if group.startswith("_container"):
            group = "Group %d" % int(group[10:])
        heights = [rect.get_height() for rect in container]
        if all(h == heights[0] for h in heights):
            # Bars of one height are read as horizontal bars (E2B's rule, applied per
            # group).
            _swap_axes(chart)
            labels = [t.get_text() for t in ax.get_yticklabels()]
            values = [rect.get_width() for rect in container]
        else:
            labels = [t.get_text() for t in ax.get_xticklabels()]
            values = heights
        for label, value in zip(labels, values):
            chart["elements"].append({"label": label, "group": group, "value": float(value)})
    return chart


def _round(number):
    """Eight significant digits around the number's magnitude, as Decimal."""
    value = Decimal(str(number))
    with localcontext() as ctx:
        ctx.prec = max(1, 8 - value.adjusted())
        return +value


def _pie_chart(ax):
    chart = _base(ax, "pie")
    for wedge in ax.patches:
        angle = abs(_round(Decimal(float(wedge.theta2)) - Decimal(float(wedge.theta1))))
        chart["elements"].append(
            {"label": wedge.get_label(), "angle": float(angle), "radius": float(wedge.r)}
        )
    return chart


def _box_chart(ax):
    chart = _base_2d(ax, "box_and_whisker")
    labels = [t.get_text() for t in ax.get_xticklabels()]
    boxes = []
    for label, patch in zip(labels, ax.patches):
        vertices = patch.get_path().vertices
        xs = [_round(x) for x in vertices[:, 0]]
        ys = [_round(y) for y in vertices[:, 1]]
        x, y = min(xs), min(ys)
        boxes.append(
            {
                "x": x,
                "y": y,
                "label": label,
                "width": max(xs) - x,
                "height": max(ys) - y,
                "outliers": [],
            }
        )
    vertical = all(box["height"] == boxes[0]["height"] for box in boxes)
    if vertical:
        _swap_axes(chart)
        for box in boxes:
            box["x"], box["y"] = box["y"], box["x"]
            box["width"], box["height"] = box["height"], box["width"]
    for line in ax.lines:
        xs = [_round(x) for x in line.get_xdata()]
        ys = [_round(y) for y in line.get_ydata()]
        if vertical:
            xs, ys = ys, xs
        if len(xs) == 1:
            # A single flier: it belongs to the box whose span holds its x.
            owner = _box_at(boxes, xs[0], xs[0])
            if owner is None:
                continue
            owner["outliers"].append(ys[0])
        if len(ys) != 2:
            continue
        owner = _box_at(boxes, xs[0], xs[1])
        if owner is None:
            continue
        top = owner["y"] + owner["height"]
        if ys[0] == ys[1] and owner["y"] <= ys[0] <= top:
            owner["median"] = ys[0]
            continue
        low, high = min(ys), max(ys)
        if high == owner["y"]:
            owner["whisker_lower"] = low
        elif low == top:
            owner["whisker_upper"] = high
    chart["elements"] = [
        {
            "label": box["label"],
            "min": float(box["whisker_lower"]),
            "first_quartile": float(box["y"]),
            "median": float(box["median"]),
            "third_quartile": float(box["y"] + box["height"]),
            "max": float(box["whisker_upper"]),
            "outliers": [float(o) for o in box["outliers"]],
        }
        for box in boxes
    ]
    return chart


def _box_at(boxes, start, end):
    for box in boxes:
        if box["x"] <= start <= end <= box["x"] + box["width"]:
            return box
    return None
