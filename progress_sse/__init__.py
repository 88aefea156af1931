"""progress-sse: live progress of long-running jobs over Server-Sent Events."""

__version__ = "0.1.0"
