"""TTG: run a parameter sweep on a fleet of workers fed by a queue, losing nothing."""

__version__ = "0.1.0"
