"""One table of a `run.py compare --json FILE` run: servekit next to its peers, cell by cell.

    python benchmarks/ratios.py /tmp/servekit-bench/compare.json

Per cell: each server's median req/s (p50 / p99 ms) over its valid rounds, the raw in-process rate with JSON, and
the medians of the per-round ratios of servekit's req/s to each peer's (both sides of a ratio come from the same
round). Then the memory of each server (front end and worker RSS) and issue 7's targets. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

NAMES = {"servekit": "servekit", "torchserve": "TorchServe", "litserve": "LitServe", "floor": "floor"}


def _f(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def server_cell(d: dict[str, Any]) -> str:
    m = d["median"]
    if m["rps"] is None:
        return "FAILED" if any("failed" in r for r in d["runs"]) else "-"
    out = f"{m['rps']:.0f} ({_f(m['p50_ms'], '.2f')} / {_f(m['p99_ms'], '.1f')})"
    if d["n_valid"] < d["n_runs"]:
        out += f" [{d['n_valid']}/{d['n_runs']} valid]"
    if any(r.get("noisy") for r in d["runs"]):
        out += " noisy"
    return out


def ratio_cell(x: dict[str, Any] | None) -> str:
    if not x or x["median"] is None:
        return "-"
    per = x["per_round"]
    return f"x{x['median']:.2f}" + (f" ({', '.join(f'{v:.2f}' for v in per)})" if len(per) > 1 else "")


def _mm(x: dict[str, float] | None) -> str:
    if not x:
        return "-"
    return f"{x['median']:.0f}" + (f" (max {x['max']:.0f})" if x["max"] - x["median"] >= 1 else "")


def targets(rep: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """Issue 7's targets (as in ../shared/bench/README.md): (name, value, passed); None = no value."""
    cells, out = rep["cells"], []

    def ratio(cell: str, name: str, need: float) -> None:
        e = cells.get(cell)
        x = (e or {}).get("ratios", {}).get(name)
        if not x or x["median"] is None:
            return
        invalid = e["servers"]["servekit"]["n_valid"] < e["servers"]["servekit"]["n_runs"]
        value = f"x{x['median']:.2f} (need >= {need}; {len(x['per_round'])} round(s))"
        out.append((f"{cell} {name}", value, x["median"] >= need and not invalid))

    def latency(cell: str, key: str, need: float) -> None:
        d = cells.get(cell, {}).get("servers", {}).get("servekit")
        if d and d["median"][key] is not None:
            ok = d["median"][key] < need and d["n_valid"] == d["n_runs"]
            out.append((f"{cell} servekit {key[:3]}", f"{d['median'][key]:.2f} ms (need < {need})", ok))

    ratio("w1:b8:c64", "servekit/torchserve", 1.3)
    ratio("w1:b8:c64", "servekit/floor", 0.9)
    latency("w1:b8:c1", "p50_ms", 1.0)
    latency("w1:b8:c1", "p99_ms", 3.0)
    ratio("w2:b8:c64", "servekit/torchserve", 1.5)
    ratio("w2:b8:c64", "servekit/raw+json", 0.8)
    fe = [m["frontend_rss_bytes"]["max"] for m in rep["memory"].get("servekit", {}).values() if m["frontend_rss_bytes"]]
    if fe:
        out.append(("servekit front end RSS", f"max {max(fe) / 1e6:.0f} MB (need < 150)", max(fe) < 150e6))
    return out


def render(rep: dict[str, Any]) -> str:
    servers = rep["servers"]
    subj = rep["subject"]
    peers = [s for s in servers if s != subj]
    ratio_names = [f"{subj}/{s}" for s in peers]
    if any("raw_json_samples_per_s" in e for e in rep["cells"].values()):
        ratio_names.append(f"{subj}/raw+json")
    st = rep["settings"]
    lines = [
        f"{NAMES.get(subj, subj)} vs {', '.join(NAMES.get(s, s) for s in peers)}: {st['repeats']} round(s), "
        f"{st['duration_s']} s per cell, servers alternating; batch delay {st['batch_delay_ms']} ms, "
        f"{st['threads']} torch thread(s), {st['format']}" + ("" if rep.get("complete") else " (INCOMPLETE)"),
        "Per server: median req/s (p50 / p99 ms); ratios: median of the per-round req/s ratios (per round).",
        "",
        "| cell | "
        + " | ".join(NAMES.get(s, s) for s in servers)
        + " | raw+json/s | "
        + " | ".join(n.replace("torchserve", "TorchServe").replace("litserve", "LitServe") for n in ratio_names)
        + " |",
        "|---" * (len(servers) + 2 + len(ratio_names)) + "|",
    ]
    for e in rep["cells"].values():
        raw = e.get("raw_json_samples_per_s")
        row = [f"{e['workload'].upper()} c{e['concurrency']} (b{e['batch']})"]
        row += [server_cell(e["servers"][s]) for s in servers]
        row.append(f"{raw['median']:.0f}" if raw and raw["median"] is not None else "-")
        row += [ratio_cell(e["ratios"].get(n)) for n in ratio_names]
        lines.append("| " + " | ".join(row) + " |")
    if rep["memory"]:
        lines += ["", "Memory after each start's last cell, RSS MiB, median over starts (max if higher):", ""]
        lines += [
            "| server | workload | front end | workers (count) | each worker process, last start | whole tree |",
            "|---" * 6 + "|",
        ]
        for s, byw in rep["memory"].items():
            for w, m in byw.items():
                each = " + ".join(
                    f"{p['rss_mib']:.0f}" for p in m.get("procs_last_start") or [] if p["role"] == "worker"
                )
                lines.append(
                    f"| {NAMES.get(s, s)} | {w} | {_mm(m['frontend_rss_mib'])} | {_mm(m['workers_rss_mib'])} "
                    f"({_mm(m['nworkers'])}) | {each or '-'} | {_mm(m['tree_rss_mib'])} |"
                )
    tg = targets(rep) if subj == "servekit" else []
    if tg:
        verdict = st["repeats"] >= 3
        lines += ["", "Targets (issue 7)" + ("" if verdict else ": fewer than 3 rounds, not a verdict") + ":"]
        lines += [f"- {'PASS' if ok else 'FAIL'} {n}: {v}" for n, v, ok in tg]
    for f in rep.get("failures", []):
        lines.append(f"FAILED: {f['server']} {f['workload']} b{f['batch']} round {f['round']}: {f['error'][:300]}")
    if rep.get("error"):
        lines.append(f"ERROR: {rep['error'][:600]}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json_file", help="the file `run.py compare --json` wrote")
    args = ap.parse_args()
    try:
        with open(args.json_file) as f:
            rep = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"ERROR: cannot read {args.json_file}: {e}")
    if not rep.get("cells"):
        sys.exit(f"ERROR: nothing was measured ({rep.get('error') or 'no cells'})")
    print(render(rep))


if __name__ == "__main__":
    main()
