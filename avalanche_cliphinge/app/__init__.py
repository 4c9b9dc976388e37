"""The application around the method: the run loop and its output folder (loggers, report,
plots, checkpoints and resume, the run lock), the comparison with Avalanche's strategies, and
the ``cliphinge`` command. The method (``avalanche_cliphinge`` itself) never imports it."""
