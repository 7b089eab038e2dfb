"""Fuzz targets and their atheris driver; the corpus lives in fuzz/corpus/."""
