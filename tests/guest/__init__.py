"""Test guests built from Debian packages (see images.py and shared/guest-image.md)."""
