"""How anything unizoo trains runs on this machine: the policies the run's stages and the pretraining loops share.

    precision.py  bf16 where the device computes it natively, fp32 elsewhere (the recipe's resolver)
    progress.py   plain progress lines in place of a bar when the output is not a terminal
    schedules.py  learning-rate schedules

It imports nothing of unizoo but `unizoo.errors`: the pretraining loops below the
components follow it as the training stages above them do.
"""
