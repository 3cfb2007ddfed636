"""How anything unizoo trains runs on this machine: the policies the run's stages and the pretraining loops share.

    accelerator.py    which device `auto` means here, settings this machine cannot run, what a GPU run turns on
    compilation.py    `compile`: the generation stage's modules through torch.compile where it pays
    fabric.py         where the pretraining loops run (the run's device and precision, through Fabric)
    library_chatter.py  quiets the libraries' log lines a user cannot act on
    precision.py      bf16 where the device computes it natively, fp32 elsewhere (the recipe's resolver)
    progress.py       plain progress lines in place of a bar when the output is not a terminal
    schedules.py      learning-rate schedules
    transfer.py       host tensors a step makes (token ids) to the device without waiting for it

It imports nothing of unizoo outside this package but `unizoo.errors`: the pretraining loops below the
components follow it as the training stages above them do.
"""
