"""Render the side-by-side table from the JSON lines run.sh collected.

Usage: python3 table.py results.jsonl
Each line: {"system": ..., "workload": ..., <metrics>, "config": ...} or
{"system": ..., "workload": ..., "error": ...}.
"""
import json
import sys

SYSTEMS = ["herald", "graphile-worker", "pg-boss", "celery"]
ROWS = [
    ("Q1", "tasks_per_s", "tasks/s"),
    ("Q1b", "tasks_per_s", "tasks/s"),
    ("Q2", "tasks_per_s", "tasks/s"),
    ("Q3", "p50_ms", "ms"),
    ("Q3", "p95_ms", "ms"),
    ("Q3", "p99_ms", "ms"),
    ("Q3", "max_ms", "ms"),
    ("Q3", "negative_samples", "count"),
]


def fmt(v):
    if isinstance(v, (int, float)):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:g}" if float(v).is_integer() else f"{v:.2f}"
    return str(v)


def main(path):
    results = {}
    order = []
    for line in open(path):
        line = line.strip()
        if not line:
            continue
        r = json.loads(line)
        key = (r["system"], r["workload"])
        results[key] = r
        if r["system"] not in order:
            order.append(r["system"])
    systems = [s for s in SYSTEMS if s in order] + [s for s in order if s not in SYSTEMS]
    workloads = {w for (_, w) in results}
    out = []
    out.append("| workload | figure | unit | " + " | ".join(systems) + " |")
    out.append("|---|---|---|" + "---:|" * len(systems))
    for w, metric, unit in ROWS:
        if w not in workloads:
            continue
        cells = []
        for s in systems:
            r = results.get((s, w))
            if r is None:
                cells.append("–")
            elif "error" in r:
                cells.append("failed")
            else:
                cells.append(fmt(r.get(metric, "–")))
        out.append(f"| {w} | {metric} | {unit} | " + " | ".join(cells) + " |")
    out.append("")
    out.append("Configuration per system and workload:")
    out.append("")
    for s in systems:
        for w in ["Q1", "Q1b", "Q2", "Q3"]:
            r = results.get((s, w))
            if r is None:
                continue
            text = r.get("error") and f"FAILED: {r['error']}" or r.get("config", "")
            if r.get("counted"):
                text += f"; completions counted from {r['counted']}"
            out.append(f"- {s} {w}: {text}")
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1])
