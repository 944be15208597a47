"""Data that ships with MediSwift Studio (installed as the package ``mediswift_resources``): the
bundled presets. Found through ``importlib.resources``, so a wheel installed anywhere has them."""
