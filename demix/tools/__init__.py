"""Maintenance tools run as modules (`python -m demix.tools.layers`)."""
