"""`unizoo study`: run a grid of recipes (`unizoo.studies.study`), one job per variant, and compare them.

    study.py     a study file (recipes/studies/*.yaml): axes x choices x seeds, expanded into variants
    command.py   the `unizoo study` command line
    launcher.py  submitit executors (local or SLURM) from the launcher settings
    status.py    the status file each variant keeps: what a re-run skips or repeats
    variant.py   the job: train one variant in a process of its own
    runner.py    expand, skip what is done, submit with at most N in flight, report
    results.py   metrics.json of every variant -> rows (results.csv)
    table.py     rows -> results.md (mean +- std over seeds, best in bold)
    plots.py     curves and bars (PNG)
    grids.py     the variants' samples of the same prompts side by side
    report.py    writes all of the above into the study folder

It imports the training loop (each variant is one `train()`), never the CLI.
"""
