"""edgeva: an edge video-analytics pipeline daemon."""

__version__ = "0.1.0"
