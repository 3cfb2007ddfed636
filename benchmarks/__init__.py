"""unizoo's throughput benchmarks (not part of the installed package).

Run from the repository root::

    python -m benchmarks.run all            # full sizes, results under benchmarks/results/<machine>/
    python -m benchmarks.run all --quick    # tiny sizes: checks the harness in seconds

Modules: ``measure`` (timing, memory, FLOPs, measured peak), ``attention_backends``
(attention kernels alone), ``peer_models`` + ``peer_dit`` (unizoo's DiT against
diffusers' DiT, training steps, every switch on both sides), ``peer_pixart`` +
``peer_suite`` (against PixArt at Q condition tokens, and as tokens and size grow),
``peer_why`` (the profiled "why" column), ``row_guard`` (rows too big for the machine),
``peer_tables`` / ``report`` (JSON + Markdown), ``run`` (the CLI).
See ``benchmarks/README.md``.
"""
