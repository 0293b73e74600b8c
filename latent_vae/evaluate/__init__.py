"""Metrics, evaluation of one model (``evaluation``: the run; ``options``, ``networks``, ``dataset``,
``statistics``, ``report``: its parts), comparison of two (``compare``)."""
