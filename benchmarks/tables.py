"""Markdown helpers shared by every results table."""

from __future__ import annotations


def _fmt(value, digits: int = 2, percent: bool = False) -> str:
    if value is None:
        return "–"
    if percent:
        return f"{100 * value:.1f}%"
    return f"{value:,.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def peaks_markdown(peaks: dict) -> str:
    rows = []
    for name, peak in peaks.items():
        rate = peak["flops_per_s"] / 1e12 if peak["flops_per_s"] else None
        digits = 3 if rate is None or rate >= 0.01 else 5  # an emulated bf16 peak is about 0.001
        rows.append([name, _fmt(rate, digits), str(peak["matmul_n"]), peak["note"]])
    return _table(["precision", "measured peak (TFLOP/s)", "matmul n", "how"], rows)
