"""`python -m benchmarks.run [attention|peer|variants|targets|loop|all] [--quick] [--out DIR] [--repeats N] ...`

Run from the repository root. Progress lines go to stderr, one per measurement; the
Markdown tables go to stdout at the end; JSON + Markdown are written under
``--out/<machine>/``. ``--quick`` shrinks every size (and uses the aot_eager compile
backend, which skips C++ code generation) so the whole run takes seconds: it checks
the harness, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from unizoo.components.generators.dit_blocks import ADALN_MODES

from .attention_backends import AttentionConfig, run_attention
from .cached_targets import TargetsConfig, run_cached_targets
from .loop import LoopConfig, run_loop
from .measure import bf16_is_emulated, measured_peaks, memory_method
from .peer_dit import run_peer
from .peer_models import PeerConfig
from .peer_suite import ScalingConfig, run_pixart, run_scaling
from .report import environment, write_results
from .row_guard import RowLimits
from .variants import VariantsConfig, load_study, run_variants

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


PEER_PARTS = ("dit", "pixart", "scaling")


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", nargs="?", default="all", choices=("attention", "peer", "variants", "targets", "loop", "all"),
                        help="which benchmark (default all)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1-2 repeats: a smoke test of the harness")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results root (default {DEFAULT_OUT})")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls/steps per measurement")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls/steps before timing")
    parser.add_argument("--peak-n", type=int, default=None, help="matmul size of the measured peak")
    group = parser.add_argument_group("attention")
    group.add_argument("--seq-lens", type=int, nargs="+", default=None, help="sequence lengths (default 64..4096)")
    group.add_argument("--attn-batch", type=int, default=None, help="batch (default 4)")
    group.add_argument("--heads", type=int, default=None, help="heads (default 6)")
    group.add_argument("--head-dim", type=int, default=None, help="head dim (default 64)")
    group.add_argument("--attn-precision", choices=("fp32", "bf16", "fp16"), nargs="+", default=None,
                       help="q/k/v dtypes (default: bf16 on CUDA; fp32 and bf16 on a CPU with bf16 instructions, "
                            "fp32 on one without, where bf16 is emulated)")
    group = parser.add_argument_group("peer (unizoo DiT vs diffusers DiT)")
    group.add_argument("--batch", type=int, default=None,
                       help="images per training step, peer and variants (default 8; --quick: 2 peer, 4 variants)")
    group.add_argument("--loss-steps", type=int, default=None, help="steps of the loss-curve check (default 20)")
    group.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor)")
    group.add_argument("--peer-parts", nargs="+", choices=PEER_PARTS, default=list(PEER_PARTS),
                       help="which comparisons: dit (vs diffusers' DiT, one class token), pixart (vs PixArt at Q "
                            "condition tokens), scaling (vs PixArt as tokens and size grow); default all")
    group.add_argument("--condition-tokens", type=int, nargs="+", default=None,
                       help="pixart: condition lengths Q (default 16 64)")
    group.add_argument("--scaling-tokens", type=int, nargs="+", default=None,
                       help="scaling: target tokens per image, square numbers (default 64 256 1024)")
    group.add_argument("--scaling-sizes", nargs="+", default=None, help="scaling: DiT sizes (default S B)")
    group.add_argument("--adaln", choices=ADALN_MODES, default=None,
                       help="unizoo DiT's modulation in every peer comparison (default: the peer's own, adaLN-Zero "
                            "against diffusers' DiT, adaLN-single against PixArt)")
    group.add_argument("--peer-size", default=None,
                       help="dit and pixart: the DiT size of both sides, a preset of unizoo's DIT_SIZES (default S: DiT-S/2); "
                            "results of another size are written as peer_dit_<size> (e.g. peer_dit_xl)")
    group.add_argument("--emulated-bf16", action="store_true",
                       help="run the bf16 rows on a CPU without bf16 instructions too, where bf16 is emulated about "
                            "100x slower than fp32 (default: skipped, saying so)")
    group.add_argument("--row-time-limit", type=float, default=None,
                       help="seconds a peer row may take; longer rows say so instead of running (default 900)")
    group.add_argument("--max-profiles", type=int, default=None,
                       help="profiles naming why unizoo is slower, per comparison, slowest pair first (default: every "
                            "slower pair; each rebuilds both rows' models and steps them again)")
    group = parser.add_argument_group("variants (a training step per design-space cell, stage and size)")
    group.add_argument("--sizes", nargs="+", default=None,
                       help="generator sizes, of tiny S B L XL (default tiny S; --quick: tiny, with a one-layer LM)")
    group.add_argument("--select", nargs="+", default=None, metavar="AXIS=CHOICE[,CHOICE]",
                       help="keep only these choices of an axis of the grid, e.g. objective=flow_matching "
                            "strategy=sequential (default: every cell)")
    group = parser.add_argument_group("targets (a training step encoding the target vs reading it from unizoo cache-targets)")
    group.add_argument("--targets-batch", type=int, default=None, help="images per step (default 64, the default recipe's; --quick: 4)")
    group = parser.add_argument_group("loop (the default recipe's bare step against the whole Lightning step)")
    group.add_argument("--loop-steps", type=int, default=None, help="timed steps of the whole loop (default 500)")
    group.add_argument("--loop-override", action="append", default=[], metavar="KEY=VALUE",
                       help="a recipe override for both steps, e.g. compile=false (repeatable)")
    return parser


def _loop_config(args) -> LoopConfig:
    cfg = LoopConfig.quick() if args.quick else LoopConfig()
    overrides = {"steps": args.loop_steps, "warmup": args.warmup, "bare_steps": args.repeats}
    if args.loop_override:
        overrides["extra_overrides"] = (*cfg.extra_overrides, *args.loop_override)
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def _targets_config(args) -> TargetsConfig:
    cfg = TargetsConfig.quick() if args.quick else TargetsConfig()
    overrides = {"batch": args.targets_batch, "warmup": args.warmup, "repeats": args.repeats}
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def _variants_config(args, parser: argparse.ArgumentParser) -> VariantsConfig:
    cfg = VariantsConfig.quick() if args.quick else VariantsConfig()
    overrides = {"sizes": tuple(args.sizes) if args.sizes else None, "batch": args.batch,
                 "select": tuple(args.select) if args.select else None, "warmup": args.warmup,
                 "repeats": args.repeats}
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    try:  # a bad --select is a usage error, found before any measurement
        study = load_study(cfg.study)
        study.parse_select(cfg.select)
    except ValueError as error:
        parser.error(str(error))
    return cfg


def _check_peer_args(args, parser: argparse.ArgumentParser) -> None:
    """Bad peer sizes are usage errors, found before any measurement."""
    from unizoo.components.generators.dit import DIT_SIZES  # noqa: PLC0415

    if args.peer_size is not None and args.peer_size not in DIT_SIZES:
        parser.error(f"--peer-size {args.peer_size}: not a DiT size; valid sizes: {', '.join(DIT_SIZES)}")
    bad_sizes = [s for s in args.scaling_sizes or () if s not in DIT_SIZES]
    if bad_sizes:
        parser.error(f"--scaling-sizes {' '.join(bad_sizes)}: not a DiT size; valid sizes: {', '.join(DIT_SIZES)}")
    bad_tokens = [n for n in args.scaling_tokens or () if n < 1 or math.isqrt(n) ** 2 != n]
    if bad_tokens:
        parser.error(f"--scaling-tokens {' '.join(map(str, bad_tokens))}: target tokens must be square numbers "
                     "(a latent grid of side sqrt(N)), e.g. 64 256 1024")
    if any(q < 1 for q in args.condition_tokens or ()):
        parser.error("--condition-tokens must be positive integers, e.g. 16 64")


def default_attention_precisions(device: torch.device) -> tuple[tuple[str, ...], str]:
    """The attention benchmark's q/k/v dtypes when ``--attn-precision`` is not given, and why."""
    if device.type == "cuda":
        return ("bf16",), "bf16, the working precision on GPUs"
    if not bf16_is_emulated(device):
        return ("fp32", "bf16"), "fp32 and bf16: this CPU computes bf16 natively (AVX512-BF16 or AMX)"
    # Emulated bf16 runs about 100x slower than fp32 here: its rows would take hours and say
    # nothing about a kernel anyone would choose on this CPU.
    return ("fp32",), "fp32 only: this CPU has no bf16 instructions (emulated bf16 is about 100x slower; --attn-precision bf16 runs it anyway)"


def _configs(args, device: torch.device) -> tuple[AttentionConfig, PeerConfig, int, int]:
    precisions = tuple(args.attn_precision or default_attention_precisions(device)[0])
    attention = AttentionConfig.quick(precisions) if args.quick else AttentionConfig(precisions=precisions)
    peer = PeerConfig.quick() if args.quick else PeerConfig()
    overrides = {
        "seq_lens": tuple(args.seq_lens) if args.seq_lens else None, "batch": args.attn_batch,
        "heads": args.heads, "head_dim": args.head_dim, "warmup": args.warmup, "repeats": args.repeats,
    }
    attention = replace(attention, **{k: v for k, v in overrides.items() if v is not None})
    overrides = {"batch": args.batch, "loss_steps": args.loss_steps, "compile_backend": args.compile_backend,
                 "warmup": args.warmup, "repeats": args.repeats, "adaln": args.adaln,
                 "emulated_bf16": args.emulated_bf16 or None, "max_profiles": args.max_profiles}
    peer = replace(peer, **{k: v for k, v in overrides.items() if v is not None})
    if args.peer_size is not None:
        from unizoo.components.generators.dit import DIT_SIZES  # noqa: PLC0415

        size = DIT_SIZES[args.peer_size]
        peer = replace(peer, depth=size["depth"], hidden=size["hidden_size"], heads=size["num_heads"])
    peak_n = args.peak_n or (256 if args.quick else 8192 if device.type == "cuda" else 4096)
    peak_repeats = args.repeats or (2 if args.quick else 5)
    return attention, peer, peak_n, peak_repeats


def _report_checks(section: dict) -> None:
    for check in section["loss_checks"]:
        _progress(f"loss check {check['variant']}: max rel diff {check['max_rel_diff']:.2e} "
                  f"(tolerance {check['tolerance_rel']:.0e}) {'pass' if check['passed'] else 'FAIL'}")
    best = section["best_vs_best"]
    if best["ratio"] is not None:
        _progress(f"best vs best ({section['config']['label']}): unizoo {best['unizoo']['variant']} / "
                  f"{section['peer']} {best['peer']['variant']} = {best['ratio']:.2f}x")


def _run_peers(args, peer_cfg: PeerConfig, device: torch.device, peaks: dict, report, write) -> None:
    limits = RowLimits(time_limit_s=args.row_time_limit) if args.row_time_limit else RowLimits()
    suffix = "" if args.peer_size in (None, "S") else f"_{args.peer_size.lower()}"
    if "dit" in args.peer_parts:
        # The table so far after each group of rows, so that a run stopped at a time limit leaves what it measured.
        result = run_peer(peer_cfg, device, peaks, progress=_progress, limits=limits,
                          on_partial=lambda partial: write(f"peer_dit{suffix}", partial, kind="peer_dit"))
        _report_checks(result)
        report(f"peer_dit{suffix}", result, kind="peer_dit")
    if "pixart" in args.peer_parts:
        result = run_pixart(peer_cfg, device, peaks, tuple(args.condition_tokens or (16, 64)), _progress, limits)
        for section in result["sections"]:
            _report_checks(section)
        report(f"peer_pixart{suffix}", result, kind="peer_pixart")
    if "scaling" in args.peer_parts:
        scaling = ScalingConfig.quick() if args.quick else ScalingConfig()
        overrides = {"tokens": tuple(args.scaling_tokens) if args.scaling_tokens else None,
                     "sizes": tuple(args.scaling_sizes) if args.scaling_sizes else None}
        scaling = replace(scaling, **{k: v for k, v in overrides.items() if v is not None})
        report("peer_scaling", run_scaling(peer_cfg, scaling, device, peaks, _progress, limits))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    variants_cfg = _variants_config(args, parser)
    _check_peer_args(args, parser)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    attention_cfg, peer_cfg, peak_n, peak_repeats = _configs(args, device)
    env = {**environment(device), "memory_method": memory_method(device)}
    _progress(f"benchmarks on {env['machine']} ({env['device_name']}, {env['torch_threads']} threads)"
              + (" [quick: tiny sizes, numbers mean nothing]" if args.quick else ""))

    peaks = measured_peaks(device, peak_n, peak_repeats)
    for name, peak in peaks.items():
        rate = f"{peak['flops_per_s'] / 1e12:.3f} TFLOP/s" if peak["flops_per_s"] else peak["note"]
        _progress(f"peak {name}: {rate} ({peak['matmul_n']}x{peak['matmul_n']} matmul)")

    tables = []

    def report(name: str, result: dict, kind: str | None = None) -> None:
        *paths, markdown = write_results(name, result, env, peaks, args.out, args.quick, kind)
        tables.append(markdown)
        _progress("wrote " + ", ".join(map(str, paths)))

    def write(name: str, result: dict, kind: str | None = None) -> None:  # a partial table, rewritten as rows come
        write_results(name, result, env, peaks, args.out, args.quick, kind)

    if args.benchmark in ("attention", "all"):
        if not args.attn_precision:
            _progress("attention precisions: " + default_attention_precisions(device)[1])
        report("attention", run_attention(attention_cfg, device, peaks, progress=_progress))
    if args.benchmark in ("peer", "all"):
        _run_peers(args, peer_cfg, device, peaks, report, write)
    if args.benchmark in ("variants", "all"):
        result = run_variants(variants_cfg, device, peaks, progress=_progress, on_partial=lambda partial: write("variants", partial))
        for pair in result["clip_vs_vae"]:
            _progress(f"CLIP/VAE {pair['size']} {pair['clip']} {pair['stage']}: {pair['ratio']:.2f}x images/s "
                      f"({'reaches' if pair['reaches_target'] else 'below'} {result['target_ratio']:g}x)")
        report("variants", result)
    if args.benchmark in ("targets", "all"):
        report("cached_targets", run_cached_targets(_targets_config(args), device, peaks, progress=_progress))
    if args.benchmark in ("loop", "all"):
        report("loop", run_loop(_loop_config(args), device, peaks, progress=_progress))
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
