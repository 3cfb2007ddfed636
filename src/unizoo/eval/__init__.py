"""GenEval-like evaluation on the shapes domain."""

from unizoo.eval.detect import DetectedObject, detect_objects
from unizoo.eval.geneval import CATEGORIES, evaluate, score_prompt

__all__ = ["CATEGORIES", "DetectedObject", "detect_objects", "evaluate", "score_prompt"]
