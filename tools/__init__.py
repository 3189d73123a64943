"""Command-line tools (run as ``python tools/NAME.py`` or ``python -m tools.NAME``)."""
