"""Accuracy-under-shift benchmark: run a method over a corruption stream, then report.

:mod:`.runner` runs one evaluation in process, :mod:`.results` is the JSON/Markdown record
of a run, :mod:`.report` aggregates runs into tables and plots, :mod:`.cli` holds the
``tta-server eval`` and ``tta-server report`` commands.
"""
