"""prefloop: a self-hosted chat app with an online preference loop."""

__version__ = "0.1.0"
