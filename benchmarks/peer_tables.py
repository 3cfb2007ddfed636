"""Markdown of the peer comparisons: one table per comparison, best vs best, and the scaling table."""

from __future__ import annotations

from .peer_models import ADALN_NAMES, recipe_default_note
from .peer_pixart import architecture_note as pixart_note
from .tables import _fmt, _table, peaks_markdown

PEER_NAMES = {"diffusers": "diffusers DiTTransformer2DModel", "pixart": "diffusers PixArtTransformer2DModel"}


def architecture_note(peer: str, adaln: str) -> str:
    """What differs between unizoo's DiT (modulation ``adaln``) and ``peer`` at the same size."""
    if peer == "pixart":
        return pixart_note(adaln)
    return (
        "Not the same model: diffusers' DiT is class-conditional (class_labels + integer timestep into adaLN-Zero); "
        "unizoo's DiT takes a condition sequence, here one (B, 1, width) token, read by cross-attention in every "
        "block (over a single key that is exactly a per-sample linear map, which is how unizoo computes it), and "
        f"modulates with {ADALN_NAMES[adaln]}" + (", as diffusers'." if adaln == "zero" else
                                                  "; diffusers' with adaLN-Zero.")
        + recipe_default_note(adaln)
    )


def _tolerances(result: dict) -> str:
    return ", ".join(f"{k} {v:.0e}" if v < 0.01 else f"{k} {100 * v:.0f}%" for k, v in result["tolerance_rel"].items())


def _best_line(result: dict) -> str:
    best, peer = result["best_vs_best"], result["peer"]
    if result.get("partial"):  # written after each group of rows: a run stopped at a time limit leaves this
        return f"**Partial: {result['partial']}.** " + _best_line({**result, "partial": None})
    if best["ratio"] is None:
        return f"Best vs best: no trusted row on one side (unizoo {best['unizoo']}, {peer} {best['peer']})."
    why = f" Why unizoo is slower: {best['why']}." if best.get("why") else ""
    return (f"Best vs best (each family's fastest row whose loss check passed): unizoo `{best['unizoo']['variant']}` "
            f"{best['unizoo']['images_per_s']:.2f} images/s, {peer} `{best['peer']['variant']}` "
            f"{best['peer']['images_per_s']:.2f} images/s: **{best['ratio']:.3f}x**; plain fp32: "
            f"{_ratio(best['fp32_ratio'])}.{why}")


def _ratio(value: float | None) -> str:
    # Three decimals: the acceptance lines sit at 1.0x and 1.2x, and 0.995 must not print as 1.00.
    return "–" if value is None else f"**{value:.3f}x**"


def section_markdown(result: dict) -> str:
    """One comparison (unizoo against one peer at one configuration), without the peaks."""
    cfg, params, flops, peer = result["config"], result["parameters"], result["flops_per_step"], result["peer"]
    checks = {c["variant"]: c for c in result["loss_checks"]}
    references = {c["reference"] for c in result["loss_checks"]}
    rows = []
    for r in result["rows"]:
        check = checks.get(r["name"])
        is_reference = r["name"] in references or r["name"] == f"{r['model']} fp32"
        verdict = "reference" if r["status"] == "ok" and not check and is_reference else "–"
        if check:
            against = "" if check["reference"].endswith("fp32") else f", vs {check['reference']}"
            verdict = f"{'pass' if check['passed'] else 'FAIL'} ({check['max_rel_diff']:.1e}{against})"
        rows.append([
            r["name"], _fmt(r["params"] / 1e6), r["switches"], _fmt(r.get("step_ms"), 1), _fmt(r.get("images_per_s")),
            _fmt(r.get("vs_peer_fp32")), _fmt(r.get("vs_peer_bf16")), _fmt(r.get("vs_peer_same")),
            _fmt(r.get("tflops_per_s"), 3), _fmt(r.get("mfu"), percent=True),
            _fmt(r.get("peak_mem_mb"), 0), _fmt(r.get("first_step_s"), 1), verdict, r.get("why") or "–", r["status"],
        ])
    header = ["variant", "params (M)", "switches", "step (ms)", "images/s", f"x {peer} fp32", f"x {peer} bf16",
              f"x {peer}, same switches", "TFLOP/s", "MFU (fraction of measured peak)", "peak memory (MiB)",
              "first step (s)", "loss vs fp32 (max rel diff)", "why (top op by self time, unizoo - peer)", "status"]
    notes = [
        f"### One training step (forward, MSE, backward, AdamW): unizoo DiT vs {PEER_NAMES[peer]}, {cfg['label']}",
        f"Parameters: unizoo {params['unizoo'] / 1e6:.2f}M, {peer} {params[peer] / 1e6:.2f}M. Model FLOPs per step "
        f"(forward + backward): unizoo {flops['unizoo'] / 1e9:.4g} G, {peer} {flops[peer] / 1e9:.4g} G. "
        # Results written before the option existed were all adaLN-Zero.
        + architecture_note(peer, cfg.get("adaln", "zero")),
        f"{cfg['steps']} steps per variant from the same init on the same data; the first {cfg['warmup']} "
        f"untimed, median of {cfg['timed_steps']} timed. "
        + ("Rows with the same switches on both sides are timed together, their steps alternating, so drift of "
           "the machine's speed hits both alike (unizoo-only rows run alone; peak memory is each row's build "
           "and warm-up, alone). " if result.get("timing") == "alternating" else "")
        + "Loss check: every step's loss within a relative "
        f"tolerance ({_tolerances(result)}) of the same family's fp32 eager loss"
        + (", or, where that row did not run, the bf16 rows' of its bf16 eager loss, marked `vs` that row"
           if any(not c["reference"].endswith("fp32") for c in result["loss_checks"]) else "")
        + " (zero-initialised "
        "matrices are re-drawn first, so every block takes part from step 1). MFU: model FLOPs per "
        "second over the measured matmul peak at the row's precision (checkpointing's recompute not counted).",
        _best_line(result),
    ]
    return "\n\n".join([*notes, _table(header, rows)])


def peer_markdown(result: dict, peaks: dict) -> str:
    return "\n\n".join([section_markdown(result), peaks_markdown(peaks)])


def sections_markdown(result: dict, peaks: dict) -> str:
    return "\n\n".join([*(section_markdown(section) for section in result["sections"]), peaks_markdown(peaks)])


def scaling_markdown(result: dict, peaks: dict) -> str:
    """One line per (size, tokens) point: each side's fp32 and best row, their ratios, why."""
    summary, detail = [], []
    for point in result["points"]:
        section = point["section"]
        best, by_name = section["best_vs_best"], {r["name"]: r for r in section["rows"]}
        peer = section["peer"]
        fp32 = [by_name.get(f"{family} fp32", {}) for family in ("unizoo", peer)]
        sides = [best["unizoo"], best["peer"]]
        statuses = sorted({r["status"] for r in section["rows"] if r["status"] != "ok"})
        summary.append([
            point["size"], str(point["tokens"]),
            _fmt(fp32[0].get("images_per_s")), _fmt(fp32[1].get("images_per_s")), _fmt(best["fp32_ratio"]),
            *(f"{s['variant']}: {s['images_per_s']:.2f}" if s else "–" for s in sides),
            *(_fmt(s["mfu"] if s else None, percent=True) for s in sides),
            _fmt(best["ratio"]), best.get("why") or "–", "; ".join(statuses) or "ok",
        ])
        checks = {c["variant"]: c for c in section["loss_checks"]}
        for r in section["rows"]:
            check = checks.get(r["name"])
            detail.append([point["size"], str(point["tokens"]), r["name"], r["switches"], _fmt(r.get("images_per_s")),
                           _fmt(r.get("mfu"), percent=True), _fmt(r.get("peak_mem_mb"), 0),
                           f"{'pass' if check['passed'] else 'FAIL'}" if check else "–", r.get("why") or "–",
                           r["status"]])
    cfg = result["config"]
    return "\n\n".join([
        f"### Scaling: unizoo DiT vs {PEER_NAMES[cfg['peer']]} as target tokens and size grow "
        f"({cfg['condition_tokens']} condition tokens of width {cfg['condition_dim']}, batch {cfg['batch']})",
        "Each point runs these switch sets on both families: " + ", ".join(cfg["switches"]) + "; best = the "
        "faster row whose loss check passed. MFU against the measured peak at the row's precision. A row that "
        "cannot fit this machine's memory or the row time limit says so in its status instead of running.",
        _table(["size", "target tokens", "unizoo fp32 images/s", "peer fp32 images/s", "x peer (fp32)",
                "unizoo best images/s", "peer best images/s", "unizoo best MFU", "peer best MFU", "x peer (best vs best)",
                "why", "status"], summary),
        _table(["size", "target tokens", "variant", "switches", "images/s", "MFU", "peak memory (MiB)",
                "loss vs fp32", "why (top op by self time, unizoo - peer)", "status"], detail),
        peaks_markdown(peaks),
    ])
