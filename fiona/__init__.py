"""FIONA: a research DICOM gateway. Data flows receive -> index -> arrive -> assign ->
de-identify -> send -> export; each step is a subpackage or module named for it."""

__version__ = "0.1.0"
