"""Export a chart as PNG or SVG at a chosen size (pyqtgraph's exporters).

pyqtgraph's exporters scale the item they are given and lock its aspect ratio, so an exact
width × height is reached by laying the chart out again at that size: a hidden copy of the plot
(same curves, pens, labels, view range, plus a legend under the plot, where it covers no curve) is
sized, exported and dropped. Text then keeps its point size instead of being stretched with the pixels;
colours and sizes are the palette's and the font's, as on screen.
"""
from __future__ import annotations

import re
from pathlib import Path

import pyqtgraph as pg
import pyqtgraph.exporters as pg_exporters
from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QApplication, QComboBox, QDialog, QDialogButtonBox, QFileDialog, QFormLayout, QHBoxLayout, QLineEdit, QPushButton,
    QSpinBox, QWidget,
)

from studio.widgets.chart_style import ChartTheme, compact_ticks, outside_legend, set_title, style_plot

FORMATS = ("png", "svg")


def _axis_label(src: pg.PlotItem, side: str) -> tuple[str, str | None]:
    axis = src.getAxis(side)
    return axis.labelText or "", axis.labelUnits or None


def _short(name: str | None, limit: int = 56) -> str | None:
    """A legend entry cut in the middle, so a long run name keeps its start and its sparsity and id."""
    if name is None or len(name) <= limit:
        return name
    return name[:limit - 25].rstrip() + "…" + name[-24:]


def _copy(src: pg.PlotItem, width: int, height: int, legend: bool) -> pg.PlotWidget:
    theme = ChartTheme.of()
    view = pg.PlotWidget(background=theme.background)
    view.setAttribute(Qt.WidgetAttribute.WA_DontShowOnScreen, True)
    view.setFrameShape(view.frameShape().NoFrame)
    view.resize(width, height)
    dst = view.getPlotItem()
    set_title(dst, src.titleLabel.text, theme)
    for side in ("bottom", "left"):
        text, units = _axis_label(src, side)
        dst.setLabel(side, text, units=units)
        dst.getAxis(side).enableAutoSIPrefix(src.getAxis(side).autoSIPrefix)
        if "tickStrings" in vars(src.getAxis(side)):  # the chart's short tick labels (chart_style.compact_ticks)
            compact_ticks(dst.getAxis(side))
    dst.showGrid(x=True, y=True, alpha=0.25)
    log_x, log_y = src.getAxis("bottom").logMode, src.getAxis("left").logMode
    if legend:
        outside_legend(dst, theme)
    for item in src.listDataItems():
        if not item.isVisible():
            continue
        o = item.opts
        if isinstance(item, pg.PlotDataItem):
            x, y = item.getOriginalDataset()
            marks = {k: o[k] for k in ("symbol", "symbolSize", "symbolPen", "symbolBrush")}
        else:  # a plain line (Compare draws its curves so): no markers
            x, y = item.getData()
            marks = {}
        if x is None or y is None:
            continue
        dst.addItem(pg.PlotDataItem(x, y, pen=o["pen"], name=_short(item.name()), **marks))
    dst.setLogMode(x=log_x, y=log_y)
    dst.setDownsampling(auto=True, mode="peak")
    dst.setClipToView(True)
    style_plot(dst, theme)
    (x0, x1), (y0, y1) = src.viewRange()
    dst.setRange(xRange=(x0, x1), yRange=(y0, y1), padding=0)
    view.show()
    QApplication.processEvents()  # lays the copy out at the requested size before it is rendered
    return view


def export_plot(plot: pg.PlotItem, path: str | Path, width: int, height: int, fmt: str | None = None,
                legend: bool = True) -> Path:
    """Write ``plot`` to ``path`` as PNG or SVG (``fmt`` defaults to the suffix), ``width`` × ``height`` pixels."""
    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        raise ValueError(f"unknown chart format {fmt!r}: use png or svg")
    if width < 16 or height < 16:
        raise ValueError("chart size must be at least 16 × 16 pixels")
    if path.suffix.lower() != f".{fmt}":
        path = path.with_suffix(f".{fmt}")
    path.parent.mkdir(parents=True, exist_ok=True)
    view = _copy(plot, int(width), int(height), legend)
    try:
        item = view.getPlotItem()
        exporter = pg_exporters.ImageExporter(item) if fmt == "png" else pg_exporters.SVGExporter(item)
        # the copy is laid out at width × height, so the locked aspect ratio already matches; set both anyway
        exporter.parameters()["width"] = int(width)
        exporter.parameters()["height"] = int(height)
        try:
            exporter.export(str(path))
        except ValueError:
            if fmt != "svg":
                raise
            # pyqtgraph 0.14's SVGExporter cannot parse the closed paths ("... Z") newer Qt writes
            # (pyqtgraph issue #3495); Qt's own SVG generator renders the same scene
            _qt_svg(item, path, int(width), int(height))
    finally:
        view.close()
        view.deleteLater()
    return path


def _qt_svg(item: pg.PlotItem, path: Path, width: int, height: int) -> None:
    from PySide6.QtCore import QRect, QRectF, QSize
    from PySide6.QtGui import QPainter
    from PySide6.QtSvg import QSvgGenerator

    gen = QSvgGenerator()
    gen.setFileName(str(path))
    gen.setSize(QSize(width, height))
    gen.setViewBox(QRect(0, 0, width, height))
    gen.setTitle(item.titleLabel.text or "chart")
    painter = QPainter(gen)
    try:
        painter.fillRect(QRectF(0, 0, width, height), ChartTheme.of().background)
        item.scene().render(painter, QRectF(0, 0, width, height), item.sceneBoundingRect())
    finally:
        painter.end()
    # Qt states the size in millimetres at 72 dpi; say the pixels that were asked for
    text = path.read_text(encoding="utf-8")
    head, sep, rest = text.partition("viewBox=")
    head = re.sub(r'width="[^"]*"', f'width="{width}px"', head, count=1)
    head = re.sub(r'height="[^"]*"', f'height="{height}px"', head, count=1)
    path.write_text(head + sep + rest, encoding="utf-8")


class ChartExportDialog(QDialog):
    """Pick a chart, a format, a size and a file; ``plots`` maps a chart title to its PlotItem."""

    def __init__(self, plots: dict[str, pg.PlotItem], current: str | None = None, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("Export chart")
        self.plots = plots
        form = QFormLayout(self)
        self.chart = QComboBox(objectName="chart")
        self.chart.addItems(list(plots))
        if current in plots:
            self.chart.setCurrentText(current)
        self.format = QComboBox(objectName="format")
        self.format.addItems(["PNG", "SVG"])
        self.width_box = QSpinBox(objectName="width", minimum=16, maximum=16384, value=1600, suffix=" px")
        self.height_box = QSpinBox(objectName="height", minimum=16, maximum=16384, value=900, suffix=" px")
        size = QHBoxLayout()
        size.addWidget(self.width_box)
        size.addWidget(self.height_box)
        self.path = QLineEdit(objectName="path")
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        where = QHBoxLayout()
        where.addWidget(self.path, 1)
        where.addWidget(browse)
        form.addRow("Chart", self.chart)
        form.addRow("Format", self.format)
        form.addRow("Size (w × h)", size)
        form.addRow("File", where)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Save | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self._save)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)
        self.written: Path | None = None

    def _browse(self) -> None:
        fmt = self.format.currentText().lower()
        path, _ = QFileDialog.getSaveFileName(self, "Export chart", self.path.text() or f"chart.{fmt}",
                                              f"{fmt.upper()} image (*.{fmt})")
        if path:
            self.path.setText(path)

    def _save(self) -> None:
        if not self.path.text().strip():
            self._browse()
            if not self.path.text().strip():
                return
        self.written = export_plot(self.plots[self.chart.currentText()], self.path.text().strip(),
                                   self.width_box.value(), self.height_box.value(), self.format.currentText().lower())
        self.accept()
