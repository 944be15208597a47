"""Live-chart benchmark: append and redraw cost as series grow to 1,000,000 points, and event-loop
latency while an engine-like process streams 200 events per second.

    QT_QPA_PLATFORM=offscreen python bench/gui_live.py [--points 1000000] [--seconds 10]

Targets: redraw under 16 ms at 1M points (min/max decimation, clip to view); p99 latency under 50 ms.
Numbers depend on the machine's load: print ``uptime`` with them.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np
from PySide6.QtCore import QElapsedTimer, Qt, QTimer
from PySide6.QtWidgets import QApplication

from studio.commands.engine_process import EngineProcess
from studio.models.plot_buffers import Series
from studio.models.run_store import RunStore
from studio.views.live_monitor import LiveMonitor
from studio.views.run_view import RunView

NAMES = ("loss", "lr", "tokens_per_s", "sparsity", "grad_norm")

GENERATOR = r"""
import sys, time, math, random
from engine.core.events import EventWriter
rate, seconds, start = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
w = EventWriter()
w.emit("run_started", run_id="bench", name="bench", stage="pretrain", config={}, run_dir="", pid=0, max_steps=10**7)
t0 = time.perf_counter()
n = 0
while True:
    now = time.perf_counter() - t0
    if now > seconds:
        break
    due = int(now * rate)
    while n < due:
        s = start + n
        layers = {f"sparsity/blocks.{i}.attn.q": 0.75 for i in range(4)} if s % 50 == 0 else {}
        w.emit("metrics", run_id="bench", step=s, tokens=s * 4096, wall_time=now, flops=s * 1e12, flops_dense=s * 2.4e12,
               metrics={"loss": 3 + math.exp(-s / 1e5) + random.random() * 0.1, "lr": 1e-3, "tokens_per_s": 5e4,
                        "sparsity": 0.75, "grad_norm": 1.0, **layers})
        n += 1
    time.sleep(0.002)
"""


def fill(monitor: LiveMonitor, n: int) -> None:
    """Grow every series to n points at once (what a long run leaves behind)."""
    d = monitor.data
    start = len(d.frames)
    if n <= start:
        return
    steps = np.arange(start + 1, n + 1, dtype=np.float64)
    x = np.column_stack([steps, steps * 4096, steps * 1e12, steps * 0.1])
    rng = np.random.default_rng(0)
    for name in NAMES:
        s = d.series.setdefault(name, Series())
        y = 3 + np.exp(-steps / 1e5) + rng.random(len(steps)) * 0.1 if name == "loss" else np.full(len(steps), 0.75)
        s.extend(np.column_stack([x, y]))
        d.dirty.add(name)
    d.frames.extend(np.column_stack([x, steps * 2.4e12]))
    d.dirty.add("frames")
    d.version += 1


def redraw_ms(app: QApplication, monitor: LiveMonitor, repeats: int = 15) -> tuple[float, float]:
    """Append a timer-tick's worth of events (20 at 200/s and 100 ms), then setData + a synchronous paint."""
    append, draw = [], []
    for _ in range(repeats):
        last = monitor.data.last_step or 0
        t0 = time.perf_counter()
        for s in range(last + 1, last + 21):
            monitor.data.add_metrics(s, s * 4096, s * 0.1, s * 1e12, s * 2.4e12,
                                     {"loss": 3.0, "lr": 1e-3, "tokens_per_s": 5e4, "sparsity": 0.75, "grad_norm": 1.0})
        t1 = time.perf_counter()
        monitor.redraw()
        monitor.glw.viewport().repaint()
        t2 = time.perf_counter()
        app.processEvents()
        append.append((t1 - t0) / 20 * 1e6)
        draw.append((t2 - t1) * 1e3)
    return float(np.median(append)), float(np.median(draw))


def latency(app: QApplication, view: RunView, rate: float, seconds: float, start: int) -> np.ndarray:
    """Lateness of a 5 ms timer while events stream in through QProcess and the run view."""
    proc = EngineProcess([], view, launcher=False)
    proc.argv = ["-c", GENERATOR, str(rate), str(seconds), str(start)]
    view.attach_process(proc)
    late: list[float] = []
    clock = QElapsedTimer()
    clock.start()
    last = [clock.nsecsElapsed()]

    def tick() -> None:
        now = clock.nsecsElapsed()
        late.append(max(0.0, (now - last[0]) / 1e6 - 5.0))
        last[0] = now

    timer = QTimer(interval=5)
    timer.setTimerType(Qt.TimerType.PreciseTimer)
    timer.timeout.connect(tick)
    n0 = len(view.data.frames)
    proc.start()
    proc.proc.waitForStarted()
    t_end = time.monotonic() + seconds + 15
    while view.data.last_step is None or view.data.last_step <= start:  # skip interpreter start-up
        app.processEvents()
        if time.monotonic() > t_end:
            raise RuntimeError("generator produced no events: " + "\n".join(proc.stderr_lines[-5:]))
    timer.start()
    while proc.is_running() and time.monotonic() < t_end:
        app.processEvents()
        time.sleep(0.0005)
    timer.stop()
    got = len(view.data.frames) - n0
    print(f"    received {got} events in ~{seconds:.0f} s ({got / seconds:.0f}/s)")
    return np.asarray(late)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", type=int, default=1_000_000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=200.0)
    args = ap.parse_args()
    app = QApplication.instance() or QApplication([])

    print(f"Qt platform: {app.platformName()}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
          "monitor 1400x800; 5 line series + FLOPs pair")
    print("append (µs/event) and redraw (ms: setData on all curves + synchronous paint), medians:")
    mon = LiveMonitor()
    mon.timer.stop()  # the bench drives redraws itself
    mon.resize(1400, 800)
    mon.show()
    for n in (10_000, 100_000, 250_000, 500_000, args.points):
        fill(mon, n)
        mon.redraw(force=True)
        for p in mon.line_plots:
            p.enableAutoRange()
        app.processEvents()
        a, r = redraw_ms(app, mon)
        print(f"  {len(mon.data.frames):>9,} points: append {a:6.1f} µs/event, redraw {r:6.2f} ms")
    final_redraw = r
    # the same at full size without decimation (ours and pyqtgraph's) or clipping, to show what they buy
    for dec in mon._decimators.values():
        dec.max_bins = 10**12
        dec.reset()
    for p in mon.line_plots:
        p.setDownsampling(auto=False, ds=1)
        p.setClipToView(False)
    mon.redraw(force=True)
    _a, r_plain = redraw_ms(app, mon, repeats=3)
    print(f"  {len(mon.data.frames):>9,} points without downsampling: redraw {r_plain:8.1f} ms")
    mon.close()  # an undecimated million-point monitor left on screen would stall the latency runs below

    print(f"event-loop latency, {args.rate:.0f} events/s for {args.seconds:.0f} s through QProcess + RunView:")
    results = {}
    for label, preload in (("empty run", 0), (f"{args.points:,} points held", args.points)):
        import tempfile

        store = RunStore(os.path.join(tempfile.mkdtemp(), "bench.db"))  # polls as in the studio
        view = RunView(store)
        view.resize(1400, 900)
        view.show()
        fill(view.monitor, preload)
        view.monitor.redraw(force=True)
        app.processEvents()
        late = latency(app, view, args.rate, args.seconds, start=preload)
        p50, p99 = np.percentile(late, 50), np.percentile(late, 99)
        results[label] = (p50, p99)
        print(f"  {label:>22}: p50 {p50:5.1f} ms, p99 {p99:5.1f} ms, max {late.max():5.1f} ms")
        view.detach()
        view.close()
        store.stop()
    worst_p99 = max(p99 for _p50, p99 in results.values())
    print(f"targets: redraw at {args.points:,} points {final_redraw:.2f} ms (< 16: "
          f"{'PASS' if final_redraw < 16 else 'FAIL'}); p99 latency {worst_p99:.1f} ms (< 50: "
          f"{'PASS' if worst_p99 < 50 else 'FAIL'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
