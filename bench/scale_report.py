"""bench/results/scale.md from scale.json (written by bench/bench_scale.py after every section)."""

from __future__ import annotations

import json
from pathlib import Path

MB = 1024 * 1024


def _setting(s: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in s.items()) or "-"


def _choices(key: str, sec: dict) -> list[str]:
    g = sec["gallery"]
    lines = [
        f"## Index choices at {g['n']:,} vectors",
        "",
        f"Gallery: {g['n']:,} rows [x, b_x] sampled around {g['seeds']:,} real image embeddings (median "
        f"nearest-neighbour angle between them {g['median_nn_angle_deg_seeds']} deg); queries: "
        f"{g['text_queries']} test captions as [q, 1] (text->image) and {g['image_queries']} test images as "
        f"[q, 0] (image->image), none of them in the gallery. Median top-1 score of a text query: "
        f"{g['text_top1_score_real_seeds_median']} over the real images, {g['text_top1_score_synthetic_median']} "
        f"over the synthetic gallery (top-10: {g['text_top10_score_synthetic_median']}).",
        "",
        "QPS: one query per call on one thread, text queries; `x exact`: over exact search (IndexFlatIP, "
        "same queries) timed right beside each setting in the same run. Recall@10 against exact search "
        "over all queries. RSS: growth of VmRSS in a fresh process (the server's imports, torch included, "
        "already loaded) from before opening the index to after 200 queries.",
        "",
        "| choice | setting | recall@10 text->image | recall@10 image->image | QPS | x exact | bytes/vector | "
        "build s | RSS growth MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, c in sec["choices"].items():
        rss = c["rss"]
        head = [
            f"`{name}` ({c['factory']})",
            c["bytes_per_vector"],
            c["build_seconds"],
            f"{rss['growth_bytes'] / MB:.0f}",
        ]
        for i, row in enumerate(c["settings"]):
            label, per_vector, build_s, memory = head if i == 0 else ["", "", "", ""]
            lines.append(
                f"| {label} | {_setting(row['setting'])} | {row['recall_text_to_image']:.3f} | "
                f"{row['recall_image_to_image']:.3f} | {row['qps']:.0f} | {row['qps_vs_exact']:.1f} | "
                f"{per_vector} | {build_s} | {memory} |"
            )
    lines += ["", "Notes and commands:", ""]
    for name, c in sec["choices"].items():
        ex = [r["exact_qps"] for r in c["settings"]]
        after = c["rss"]["after_queries"]
        lines.append(
            f"- `{name}`: {c['note']}; storage {c['storage']}, {c['index_bytes'] / MB:.0f} MB on disk; exact "
            f"search {min(ex):.1f}-{max(ex):.1f} q/s; RSS growth {c['rss']['growth_over_index']:.3f} of the "
            f"index size (process total {after['VmRSS'] / MB:.0f} MB: anonymous {after['RssAnon'] / MB:.0f}, "
            f"file-backed {after['RssFile'] / MB:.0f}); `{c['command']}` on {c['date']}, "
            f"load average at start {c['machine']['load_average_at_start']}."
        )
    return lines + [""]


def _metadata(key: str, sec: dict) -> list[str]:
    lines = [
        f"## Metadata lookups at {sec['rows']:,} rows",
        "",
        f"`meta.sqlite` in the builder's schema (`images(id INTEGER PRIMARY KEY, uri, sha256)`, random 64-bit "
        f"ids as the builder's), {sec['file_bytes'] / MB:.0f} MB"
        + (f", written in {sec['write_seconds']} s" if sec.get("write_seconds") else "")
        + "; looked up as `IndexVersion.metadata` does (`schema.select_rows`: `SELECT ... WHERE id IN (...)`, 500 ids a statement) "
        "with ids drawn at random.",
        "",
        "| k ids | first call ms | median ms | p99 ms | repeats |",
        "| --- | --- | --- | --- | --- |",
    ]
    for k, v in sec["lookups"].items():
        lines.append(f"| {k} | {v['first_ms']} | {v['median_ms']} | {v['p99_ms']} | {v['repeats']} |")
    return lines + ["", f"`{sec['command']}` on {sec['date']}.", ""]


def _memory(key: str, sec: dict) -> list[str]:
    lim, free = sec["runs"]["limited"], sec["runs"]["unlimited"]
    size = sec["index_bytes"]
    lines = [
        f"## Serving the memory-mapped {sec['n']:,}-vector index under a memory limit",
        "",
        f"The on-disk IVF index ({size / MB:,.0f} MB: `images.faiss` and its `.ivfdata` lists) opened as the server "
        f"opens it, {sec['setting']}, 200 text queries on one thread, from a cold page cache (dropped before each "
        f"run): once in a memory cgroup limited to {sec['limit_bytes'] / MB:,.0f} MB "
        f"({sec['limit_bytes'] / size:.0%} of the index), once without a limit.",
        "",
        "| run | VmRSS after MB | of the index | anonymous MB | file-backed MB | QPS |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in (("in the cgroup", lim), ("no limit", free)):
        lines.append(
            f"| {name} | {r['vmrss_after_bytes'] / MB:,.0f} | {r['vmrss_after_bytes'] / size:.1%} | "
            f"{r['rss_anon_after_bytes'] / MB:,.0f} | {r['rss_file_after_bytes'] / MB:,.0f} | {r['qps']} |"
        )
    return lines + ["", f"`{sec['command']}` on {sec['date']}.", ""]


def write(json_path: Path, md_path: Path) -> None:
    result = json.loads(json_path.read_text()) if json_path.is_file() else {}
    lines = [
        "# Scale benchmark",
        "",
        "Made by `bench/bench_scale.py` (the method is in its docstring); raw numbers in `scale.json`.",
        "",
    ]
    summary = result.get("summary")
    if summary:
        lines += summary + [""]
    for key in sorted(result, key=lambda k: (k.split("-")[0], int(k.split("-")[1]) if k.count("-") else 0)):
        if key.startswith("choices-"):
            lines += _choices(key, result[key])
        elif key.startswith("metadata-"):
            lines += _metadata(key, result[key])
        elif key.startswith("memory-"):
            lines += _memory(key, result[key])
    md_path.write_text("\n".join(lines).rstrip() + "\n")
