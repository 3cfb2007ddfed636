"""Training: the run loop (`unizoo train`) and everything it calls per run, per stage or per step.

    train.py           train(recipe) -> run directory: prepare, evaluate, fit every stage, evaluate
    build.py           a composed recipe -> a `UnifiedModel` (components instantiated and wired)
    runs.py            the run directory: its files, and a trained run loaded back (`unizoo sample`)
    launch.py          one run, many processes: who writes, and the run directory they share
    resume.py          `resume=RUN_DIR`: which stages to skip, which to restart from their checkpoint
    stage_callbacks.py the callbacks every stage trains with (checkpoints, seeds, NaN stop, EMA, faults)
    stage_weights.py   what a run that starts at a later stage takes from `init_checkpoint`
    checkpoints.py     checkpoint files written atomically, and the newest readable one found again
    step_seeds.py      every step's randomness from (seed, stage, step, rank)
    ema.py             the generator's exponential moving average
    nonfinite.py       a NaN or inf loss stops the stage before it reaches the weights
    faults.py          fault injection for tests (`debug.*`)
    loss_log.py        the per-step loss CSV of a run that is killed and resumed
    run_loggers.py     the `logger` recipe group: CSV, TensorBoard, W&B, MLflow
    throughput.py      what a stage cost, for metrics.json
    model_summary.py   the table of modules and parameters a stage logs when it starts
    sharding.py        `trainer=fsdp`: the strategy, and the copy each stage fits
    cache_targets.py   `unizoo cache-targets`: the training set encoded once

It may import every package below it (eval, the model, components, data, pretraining,
config, runtime, text); only `unizoo.studies` and the CLI import it.
"""
