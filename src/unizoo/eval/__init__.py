"""Evaluation: the shapes evaluator, and the evaluations a run makes of its model.

The shapes domain's GenEval-like evaluator (its names are handed on here):
    detect.py                 an image parsed into objects (colour, component, shape, position)
    geneval.py                prompt-alignment scores of (prompt, image) pairs, with strict scores
    chance.py                 the scores real images get against other images' prompts
    understanding.py          generated captions of held-out images parsed against the truth
Scores that need no exact evaluator:
    agreement.py              caption-image agreement in a CLIP's shared embedding
    features.py, frechet.py   image features and the Frechet distance in them (FID)
    diversity.py              how different one prompt's samples are
What a run evaluates, and when:
    generation_evaluator.py   the run's evaluator, chosen by what the data allows
    evaluation.py             samples and captions scored before and after each stage
    sample_statistics.py      FID and diversity of a run's samples
    periodic_evaluation.py    the curve of scores against steps, every N steps
    experiment_log.py         scores and sample grids sent to the run's loggers

It imports the model, the components, data and pretraining, never `unizoo.training`.
"""

from unizoo.eval.chance import chance_levels
from unizoo.eval.detect import DetectedObject, detect_objects
from unizoo.eval.geneval import CATEGORIES, STRICT_CATEGORIES, evaluate, score_prompt

__all__ = ["CATEGORIES", "STRICT_CATEGORIES", "DetectedObject", "chance_levels", "detect_objects", "evaluate", "score_prompt"]
