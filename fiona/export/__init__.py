"""Exports: de-identified studies into researchers' hands as files (issue 14)."""
