"""trackproxy: an HTTPS reverse proxy for email engagement-tracking domains."""

__version__ = "0.1.0"
