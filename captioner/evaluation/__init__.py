"""Scoring captions against references: the COCO caption metrics with caption-quality counts, and
CHAIR-style object hallucination and recall."""
