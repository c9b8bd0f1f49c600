"""An image's classification labels, remembered by what the rules read of it.

Why: the rules run on every image (a SeriesLevel label needs every image of the series to
hold), ~48 clause checks per image with the shipped rules, and with the pydicom conversions
they trigger they were ~30 % of the indexer's CPU on the 1,000-image bench study. The images
of a series mostly carry the same bytes in every element the rules test. An image's
signature (`ImageRecord.signature`) is the whole of what a rule can see, so an image whose
signature matches an earlier one's gets that image's labels, exactly; only the first image of
a series, and images that differ in a tested element (an echo time, say), run the rules.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from .classify import RuleSet
from .header import ImageRecord

#: signatures kept; a burst of series with distinct signatures clears the memo, nothing more
MEMO_SIZE = 4096


class LabelMemo:
    """The labels of images for one rule set, each distinct signature classified once."""

    def __init__(self, rules: RuleSet) -> None:
        self.rules = rules
        self._labels: dict[tuple, tuple[str, ...]] = {}

    def labels(self, image: ImageRecord, ds: Dataset) -> list[str]:
        """The labels of one image; the rules see this image's own fields."""
        key = image.signature(self.rules.inputs)
        if key is None:
            return self.rules.classify(image, ds)
        labels = self._labels.get(key)
        if labels is None:
            if len(self._labels) >= MEMO_SIZE:
                self._labels.clear()
            labels = self._labels[key] = tuple(self.rules.classify(image, ds))
        return list(labels)
