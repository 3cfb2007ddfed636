"""GenEval-like evaluation on the shapes domain, with strict scores and chance levels."""

from unizoo.eval.chance import chance_levels
from unizoo.eval.detect import DetectedObject, detect_objects
from unizoo.eval.geneval import CATEGORIES, STRICT_CATEGORIES, evaluate, score_prompt

__all__ = ["CATEGORIES", "STRICT_CATEGORIES", "DetectedObject", "chance_levels", "detect_objects", "evaluate", "score_prompt"]
