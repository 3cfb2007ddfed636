"""Recipes: composition of the YAML files, their values checked against the components, local weights.

    composition.py   Hydra composition of `recipes/`; a bad group choice or key named in one paragraph
    recipe_types.py  recipe values checked against the types the components declare, before anything is built
    weights.py       `pretrained:` values: local paths only, a missing one named with what belongs there

Components import it (their `ArgumentsOf` annotations, `local_weights`), so it imports
nothing of unizoo but `unizoo.errors` and `unizoo.runtime` (the precision resolver).
Building a model from a composed recipe is `unizoo.training.build`.
"""
