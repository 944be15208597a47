"""MediSwift Studio: the desktop app (PySide6) that configures, launches and monitors engine runs."""
