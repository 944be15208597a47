"""``mediswift-studio``: the desktop app."""
from __future__ import annotations

import argparse
import os
import sys

from engine.core.paths import DB_ENV, default_db_path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mediswift-studio", description="Configure, launch and monitor MediSwift runs.")
    p.add_argument("--db", default=None, help=f"run database (default: ${DB_ENV} or {default_db_path()})")
    p.add_argument("--runs-dir", default=None, help="folder for run folders (default: next to the database)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from PySide6.QtWidgets import (
        QApplication,  # after argparse, so --help works without a display
    )

    from studio.views.main_window import MainWindow

    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setApplicationName("MediSwift Studio")
    app.setOrganizationName("MediSwift")
    win = MainWindow(os.path.expanduser(args.db) if args.db else None, args.runs_dir)
    win.show()
    return app.exec()


if __name__ == "__main__":
    sys.exit(main())
