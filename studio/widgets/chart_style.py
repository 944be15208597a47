"""Chart colours and text sizes taken from the application's palette and font, for every pyqtgraph chart.

pyqtgraph draws with its own colours (a global white or black background, fixed pens) and fixed point
sizes, so a dark palette left the charts white and a larger application font left their text small.
``ChartTheme.of(widget)`` reads what the widget would use (palette Base and Text, its font's point size);
``style_plot`` applies it to a PlotItem (background, axis pens, tick and label fonts, title, legend);
``ThemeFollower`` calls a view's restyling once after any palette, font or style change.

Also here: ``padded_range`` (a flat series gets a visible y range), ``OutsideLegend`` (a legend in its
own row under the plot, where it cannot cover data) and ``compact_ticks`` (short tick labels: 3
significant digits, k/M/G/T suffixes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pyqtgraph as pg
from PySide6.QtCore import QEvent, QObject, QTimer
from PySide6.QtGui import QColor, QFont, QFontMetrics, QGuiApplication, QPalette
from PySide6.QtWidgets import QWidget

BASE_POINTS = 9.0  # chart text sizes below are relative to an application font of this size
TITLE, LABEL, TICK, LEGEND = 1.1, 1.0, 0.9, 0.9  # relative sizes of the chart texts
MIN_CONTRAST = 3.0  # WCAG's minimum for graphics; a curve colour below it is flipped in lightness


def _luminance(c: QColor) -> float:
    def channel(v: float) -> float:
        return v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4
    return 0.2126 * channel(c.redF()) + 0.7152 * channel(c.greenF()) + 0.0722 * channel(c.blueF())


def contrast(a: QColor, b: QColor) -> float:
    """WCAG contrast ratio of two colours (1 to 21)."""
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def blend(a: QColor, b: QColor, t: float) -> QColor:
    """``t`` of ``a`` and ``1 - t`` of ``b``."""
    return QColor.fromRgbF(*(t * x + (1 - t) * y for x, y in zip(a.getRgbF()[:3], b.getRgbF()[:3])))


@dataclass(frozen=True)
class ChartTheme:
    background: QColor
    text: QColor
    point_size: float  # the application (or widget) font's size: chart text scales with it

    @classmethod
    def of(cls, widget: QWidget | None = None) -> ChartTheme:
        """The theme a widget should draw with (the application's when there is no widget)."""
        palette = widget.palette() if widget is not None else QGuiApplication.palette()
        font = widget.font() if widget is not None else QGuiApplication.font()
        points = font.pointSizeF()
        if points <= 0:  # a font sized in pixels
            points = font.pixelSize() * 72.0 / 96.0 if font.pixelSize() > 0 else BASE_POINTS
        return cls(QColor(palette.color(QPalette.ColorRole.Base)), QColor(palette.color(QPalette.ColorRole.Text)),
                   points)

    @property
    def axis(self) -> QColor:
        """Axis lines and ticks: between text and background, so the curves stand out."""
        return blend(self.text, self.background, 0.55)

    @property
    def muted(self) -> QColor:
        """Secondary text (placeholders, captions)."""
        return blend(self.text, self.background, 0.6)

    @property
    def scale(self) -> float:
        return self.point_size / BASE_POINTS

    def points(self, relative: float) -> float:
        return round(self.point_size * relative, 1)

    def size(self, relative: float) -> str:
        """A CSS size for pyqtgraph's text items ('9.9pt')."""
        return f"{self.points(relative)}pt"

    def font(self, relative: float = 1.0, bold: bool = False) -> QFont:
        f = QFont(QGuiApplication.font())
        f.setPointSizeF(self.points(relative))
        f.setBold(bold)
        return f

    def readable(self, color) -> QColor:
        """``color``, or the same hue with its lightness flipped when it would not stand out on the
        background (black or dark blue on a dark chart)."""
        c = pg.mkColor(color)
        if contrast(c, self.background) >= MIN_CONTRAST:
            return c
        h, s, lightness, a = c.getHslF()
        flipped = QColor.fromHslF(max(h, 0.0), s, 1.0 - lightness, a)
        return flipped if contrast(flipped, self.background) >= MIN_CONTRAST else blend(flipped, self.text, 0.5)

    def faint(self, color, amount: float = 0.45) -> QColor:
        """A lighter (light theme) or darker (dark theme) shade of ``color``: raw values behind a smoothed curve."""
        return blend(self.readable(color), self.background, amount)


def set_pyqtgraph_defaults(theme: ChartTheme) -> None:
    """Colours for chart items created without explicit ones (pyqtgraph reads its config at creation):
    set after each palette change, so a chart built later (another tab) starts in the current colours."""
    pg.setConfigOptions(background=theme.background, foreground=theme.text)


# before any view follows a palette (or without an application yet): the light defaults charts had
pg.setConfigOptions(background="w", foreground="#333")
if QGuiApplication.instance() is not None:
    set_pyqtgraph_defaults(ChartTheme.of())


def set_title(plot: pg.PlotItem, text: str | None, theme: ChartTheme) -> None:
    """The plot's title in the theme's colour and size, in a row tall enough for that size."""
    if text is None:
        plot.setTitle(None)
        return
    plot.setTitle(text, color=theme.text.name(), size=theme.size(TITLE))
    height = QFontMetrics(theme.font(TITLE)).height() + 8
    plot.titleLabel.setMaximumHeight(height)
    plot.layout.setRowFixedHeight(0, height)


def style_plot(plot: pg.PlotItem, theme: ChartTheme) -> None:
    """Colours and fonts of one plot: axes, tick labels, axis labels, title, grid and legend."""
    plot.getViewBox().setBackgroundColor(theme.background)
    tick_font = theme.font(TICK)
    for side in ("left", "bottom", "right", "top"):
        axis = plot.getAxis(side)
        axis.setPen(theme.axis)
        axis.setTextPen(theme.text)
        axis.setTickFont(tick_font)
        if axis.label.isVisible():  # re-set the label so its style (colour, size) is rendered again
            axis.setLabel(axis.labelText, axis.labelUnits, axis.labelUnitPrefix, axis.getSIPrefixEnableRanges(),
                          axis.unitPower, **{"color": theme.text.name(), "font-size": theme.size(LABEL)})
        # room for the tick labels at this font size (an axis given a fixed width keeps it, scaled)
        fixed = getattr(axis, "base_width", None)
        if fixed:
            axis.setWidth(int(round(fixed * max(theme.scale, 1.0))))
    if plot.titleLabel.isVisible():
        set_title(plot, plot.titleLabel.text, theme)
    legend = plot.legend
    if legend is not None:
        style_legend(legend, theme)


def style_legend(legend: pg.LegendItem, theme: ChartTheme) -> None:
    legend.setLabelTextColor(theme.text)
    legend.setLabelTextSize(theme.size(LEGEND))
    for _sample, label in legend.items:  # pyqtgraph keeps the new style for the next text: render it now
        label.setText(label.text)
    legend.setBrush(pg.mkBrush(theme.background))
    legend.setPen(pg.mkPen(None))
    if isinstance(legend, OutsideLegend):
        legend.text_font = theme.font(LEGEND)
        legend.reflow()


def fixed_axis_width(plot: pg.PlotItem, side: str, width: int) -> None:
    """A fixed tick-label width at the base font size, scaled with the font by ``style_plot``
    (a fixed width: new tick labels do not re-lay out the chart and re-fit every linked view)."""
    axis = plot.getAxis(side)
    axis.base_width = width
    axis.setWidth(width)


# -- ranges -------------------------------------------------------------------------------------------


def padded_range(lo: float, hi: float, padding: float = 0.05) -> tuple[float, float]:
    """A y range for values in [lo, hi]: ``padding`` of the span on each side, and for a flat series
    (all values equal) 10 % of the value each side (±0.5 at zero), so it shows as a line mid-chart with
    readable ticks instead of pyqtgraph's arbitrary ±0.5 around 40.0."""
    span = hi - lo
    if span > 1e-12 * max(abs(lo), abs(hi), 1e-300):
        return lo - padding * span, hi + padding * span
    half = 0.1 * abs(lo) if lo != 0 else 0.5
    return lo - half, hi + half


def is_flat(lo: float, hi: float) -> bool:
    return hi - lo <= 1e-12 * max(abs(lo), abs(hi), 1e-300)


# -- legends outside the plot area ---------------------------------------------------------------------


class OutsideLegend(pg.LegendItem):
    """A legend in a row of its own under the plot's x axis: it never covers a curve. Entries flow left
    to right and wrap to as many rows as the plot's width needs (``reflow`` after a resize)."""

    ROW = 4  # the PlotItem's grid: title 0, top axis 1, view 2, bottom axis 3

    def __init__(self, plot: pg.PlotItem, **kwargs):
        super().__init__(offset=None, colCount=1, horSpacing=4, **kwargs)
        self.layout.setContentsMargins(0, 2, 0, 0)  # (Qt's default margins would push the text out of its row)
        self.plot = plot
        self.setParentItem(plot)
        plot.layout.addItem(self, self.ROW, 1)
        plot.legend = self  # PlotItem.addItem lists named items here
        self.frame = False
        self.setMinimumWidth(0)  # its entries wrap to the plot's width: a long name must not widen the chart
        self.text_font = ChartTheme.of().font(LEGEND)
        plot.getViewBox().sigResized.connect(lambda *_a: self.reflow())

    def addItem(self, item, name):
        super().addItem(item, name)
        self.reflow()

    def removeItem(self, item):
        super().removeItem(item)
        self.reflow()

    def clear(self):
        super().clear()
        self.reflow()

    def updateSize(self) -> None:
        self.updateGeometry()  # the plot's layout places and sizes it (pyqtgraph's would move it to 0, 0)

    def mouseDragEvent(self, ev) -> None:
        ev.ignore()  # it belongs to the layout: not dragged over the data

    def reflow(self) -> None:
        """As many entries per row as fit the plot's width."""
        if not self.items:
            self.setMaximumHeight(0)
            self.updateGeometry()
            return
        fm = QFontMetrics(self.text_font)  # the text's own width: a laid-out label is stretched to its cell
        width = max(self.plot.getViewBox().width(), 50.0)
        entry = max(sample.boundingRect().width() + fm.horizontalAdvance(lab.text) + 24 for sample, lab in self.items)
        cols = max(1, min(len(self.items), int(width // max(entry, 1.0))))
        if cols != self.columnCount:
            self.setColumnCount(cols)
        rows = math.ceil(len(self.items) / cols)
        self.layout.invalidate()
        line = max(max(sample.boundingRect().height(), lab.preferredHeight()) for sample, lab in self.items)
        height = rows * max(line, fm.height() + 6) + 2
        self.setMaximumHeight(height)
        self.setMinimumHeight(height)
        self.updateGeometry()


def outside_legend(plot: pg.PlotItem, theme: ChartTheme | None = None) -> OutsideLegend:
    legend = OutsideLegend(plot)
    style_legend(legend, theme or ChartTheme.of())
    return legend


# -- tick labels ----------------------------------------------------------------------------------------

SI = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def compact_number(v: float, digits: int = 3) -> str:
    """3 significant digits, k/M/G/T for large values: '26.2G', '0.00125', '1.2k', '40'."""
    if not math.isfinite(v):
        return str(v)
    a = abs(v)
    for factor, suffix in SI:
        if a >= factor:
            return f"{v / factor:.{digits}g}{suffix}"
    if a == 0:
        return "0"
    return f"{v:.{digits}g}"


def compact_ticks(axis: pg.AxisItem) -> None:
    """Tick labels of ``axis`` as short numbers (``compact_number``) instead of pyqtgraph's
    fixed decimals ('10.4689827844'); log axes keep their own labels."""
    default = axis.tickStrings

    def strings(values, scale, spacing):
        if axis.logMode:
            return default(values, scale, spacing)
        # enough digits to tell neighbouring ticks apart (10.4685 and 10.4690 on a narrow range)
        top, step = max((abs(v * scale) for v in values), default=0.0), spacing * scale
        digits = 3 if step <= 0 or top == 0 else min(6, max(3, math.ceil(math.log10(top / step)) + 1))
        return [compact_number(v * scale, digits) for v in values]

    axis.tickStrings = strings


# -- following palette and font changes ----------------------------------------------------------------

THEME_EVENTS = (QEvent.Type.PaletteChange, QEvent.Type.FontChange, QEvent.Type.StyleChange,
                QEvent.Type.ApplicationPaletteChange, QEvent.Type.ApplicationFontChange)


class ThemeFollower(QObject):
    """Calls ``apply(theme)`` when ``widget``'s palette, font or style changes: once per burst (a font
    change arrives as several events), on the next turn of the event loop, and once at creation."""

    def __init__(self, widget: QWidget, apply: Callable[[ChartTheme], None]):
        super().__init__(widget)
        self.widget = widget
        self._apply = apply
        self._applying = False
        self._timer = QTimer(self, singleShot=True, interval=0)
        self._timer.timeout.connect(self.apply_now)
        widget.installEventFilter(self)
        self.theme = ChartTheme.of(widget)
        set_pyqtgraph_defaults(self.theme)
        apply(self.theme)

    def eventFilter(self, obj, event) -> bool:
        if obj is self.widget and not self._applying and event.type() in THEME_EVENTS:
            self._timer.start()
        return False

    def apply_now(self) -> None:
        self._applying = True  # restyling children may send more change events: not a new burst
        try:
            self.theme = ChartTheme.of(self.widget)
            set_pyqtgraph_defaults(self.theme)
            self._apply(self.theme)
        finally:
            self._applying = False
