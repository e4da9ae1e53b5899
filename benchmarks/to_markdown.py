"""Render benchmark JSON files (python -m bsconv_fast bench --json ..., benchmarks/torchvision_models.py --json ...)
as one markdown report.

usage: python benchmarks/to_markdown.py OUT.md IN.json [IN.json ...]
"""
import json
import sys

COLUMNS = [("case", "case"), ("backend", "backend"), ("eager-cl_ms", "eager-cl ms"), ("eager-clx_ms", "eager-clx ms"),
           ("ort_ms", "ORT ms"), ("ort-spin_ms", "ORT spin ms"), ("fused_ms", "fused ms"), ("speedup", "vs eager"), ("vs_ort", "vs ORT"),
           ("fused_gflops", "GFLOP/s"), ("peak_pct", "% peak"), ("ceiling_vs_eager", "ceiling vs eager"),
           ("ceiling_vs_ort", "ceiling vs ORT"), ("err_max_abs", "max abs err")]


def cell(key, value):
    if value is None:
        return "-"
    if key == "err_max_abs":
        return f"{value:.1e}"
    if isinstance(value, float):
        return f"{value:.3f}" if key.endswith("_ms") else f"{value:.2f}"
    return str(value)


def render(data):
    keys = [(k, h) for k, h in COLUMNS if any(k in r for r in data["rows"])]
    lines = [f"## suite `{data['suite']}` — {data['threads']} thread(s)", "",
             f"{data['machine']}; commit {data['commit']}; {data['date']}; median of {data['reps']} runs"
             f" in turns of {data.get('block', 5)} calls"
             + (f", {data['pause_ms']:g} ms pause before each turn" if data.get("pause_ms") else ""), ""]
    summary = {k: v for k, v in data.items()
               if k not in ("rows", "machine", "commit", "date", "suite", "threads", "reps", "block", "pause_ms")}
    lines.append("summary: " + ", ".join(f"{k} = {v:.2f}" if isinstance(v, float) else f"{k} = {v}"
                                         for k, v in summary.items()))
    lines += ["", "| " + " | ".join(h for _, h in keys) + " |", "|" + "---|" * len(keys)]
    for r in data["rows"]:
        lines.append("| " + " | ".join(cell(k, r.get(k)) for k, _ in keys) + " |")
    return "\n".join(lines) + "\n"


def main(argv):
    if len(argv) < 2 or any(a.startswith("-") for a in argv):  # `--help` once became an output file
        sys.exit(__doc__.strip())
    out, inputs = argv[0], argv[1:]
    parts = ["# bsconv_fast CPU benchmark results", ""]
    for path in inputs:
        with open(path) as f:
            parts.append(render(json.load(f)))
    with open(out, "w") as f:
        f.write("\n".join(parts))


if __name__ == "__main__":
    main(sys.argv[1:])
