"""The exit rule, in one place and without torch: the serving scheduler and offline inference use it.

A request leaves after a stage when its confidence reaches its threshold. Threshold 1 means "run
every stage", even when a saturated softmax gives a confidence of exactly 1. Written with ``>=``,
``<`` and ``&`` only, so it applies alike to floats (the scheduler, one request at a time) and to
tensors (offline inference, a whole batch at once).
"""

from __future__ import annotations


def exits_early(confidence, threshold):
    """Whether an image leaves after a stage that is not the last: floats or tensors."""
    return (confidence >= threshold) & (threshold < 1.0)
