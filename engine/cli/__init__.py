"""The engine's command line: ``mediswift`` (also ``python -m engine``); see main.py."""
from engine.cli.main import main

__all__ = ["main"]
