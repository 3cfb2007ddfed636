"""The mistakes of a user's that the CLI reports in one paragraph, with exit status 2 and no traceback.

Kept free of imports: the CLI catches these and every layer below it raises them (the
recipe checks, the training machinery, the study command), so this module must never pull
in a heavier one. Data that cannot be trained on has its own: `unizoo.data.errors.DataError`.
"""


class UsageError(Exception):
    """A mistake of the user's: reported in one paragraph, exit status 2."""


class RecipeError(ValueError):
    """A recipe name, group choice or key that does not exist."""
