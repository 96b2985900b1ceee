"""rlhf-compare's report.html: one self-contained page (figures inlined) with the comparison
table, the tables over seeds, and each run's diagnosis, last samples and optimum. `runs` are
rlhf-compare's runs (a path, the flattened config, the metrics rows)."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from rlhf.core.run import rundir


def fmt(v: Any) -> str:
    """A table cell: floats to 4 significant digits."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def report(root: Path, out: Path, runs: list, table: tuple[list[str], list[list[str]]], files: dict[str, Path],
           seeds=None) -> Path:
    """report.html in `out`: the table, the tables over seeds, the figures inlined, each run's
    diagnosis, samples and (toy problems) optimum."""
    header, rows = table
    def cells(tag, row):
        return "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in row)
    images = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{name.replace('_', ' ')}</figcaption></figure>"
        for name, p in files.items()
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>rlhf-compare: {html.escape(str(root))}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}} th{{background:#eee}}
figure{{display:inline-block;margin:1em}}</style></head>
<body><h1>rlhf-compare</h1><p>{len(runs)} runs under <code>{html.escape(str(root))}</code></p>
<table><thead><tr>{cells("th", header)}</tr></thead>
<tbody>{"".join(f"<tr>{cells('td', r)}</tr>" for r in rows)}</tbody></table>
{_seeds_html(seeds, cells)}{images}{diagnosis_section(runs, root)}{samples_section(runs, root)}
{optimum_section(runs, root)}</body></html>
"""
    path = out / "report.html"
    path.write_text(page)
    return path


def _seeds_html(seeds, cells) -> str:
    if seeds is None:
        return ""
    tables, lines = seeds[:-1], seeds[-1]
    return ("<h2>Over seeds</h2>" + "".join(
        f"<table><thead><tr>{cells('th', header)}</tr></thead><tbody>"
        + "".join(f"<tr>{cells('td', r)}</tr>" for r in rows) + "</tbody></table><br>" for header, rows in tables if rows)
        + "<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in lines) + "</ul>")


def _name(run, root: Path) -> str:
    return html.escape(str(run.path.relative_to(root)) if run.path.is_relative_to(root) else str(run.path))


def diagnosis_section(runs: list, root: Path) -> str:
    """Each run's findings (rlhf-diagnose's), or "no findings"."""
    from rlhf.core.evaluation import diagnosis

    blocks = []
    for run in runs:
        try:
            findings = diagnosis.diagnose(diagnosis.load(run.path)) if run.rows else []
        except Exception as e:  # one run's odd record does not cost the report
            findings = [diagnosis.Finding("diagnosis failed", f"{type(e).__name__}: {e}", ("rlhf-diagnose on the run",))]
        items = "".join(f"<li><b>{html.escape(f.name)}</b>: {html.escape(f.evidence)}<br><i>try:</i> "
                        f"{html.escape('; '.join(f.knobs))}" + (f"<br><i>sample:</i> <code>{html.escape(f.sample)}</code>"
                                                                 if f.sample else "") + "</li>" for f in findings)
        verdict = f"<ul>{items}</ul>" if findings else ("<p>no findings</p>" if run.rows else "<p>no metrics log</p>")
        blocks.append(f'<div class="diagnosis"><h3>{_name(run, root)}</h3>{verdict}</div>')
    return f"<h2>Diagnosis</h2>{''.join(blocks)}"


def samples_section(runs: list, root: Path, n: int = 4) -> str:
    """The last evaluation's first samples of each run."""
    blocks = []
    for run in runs:
        samples = rundir.read_samples(run.path)
        if not samples:
            continue
        step, rows = max(samples.items())
        rows = rows[:n]
        items = "".join(f"<li><q>{html.escape(str(r.get('query', '')))}</q> &rarr; <q>{html.escape(str(r.get('response', '')))}"
                        f"</q> (reward {fmt(r.get('reward'))})</li>" for r in rows)
        blocks.append(f"<details><summary>{_name(run, root)}: step {step}</summary><ul>{items}</ul></details>")
    return f"<h2>Samples at the last evaluation</h2>{''.join(blocks)}" if blocks else ""


def optimum_section(runs: list, root: Path) -> str:
    """Runs with eval.kl_to_optimum: pi_ref, the trained pi and pi* side by side, one block each."""
    from rlhf.core.evaluation.optimum import format_table

    blocks = []
    for run in runs:
        path = run.path / rundir.OPTIMUM
        try:
            text = format_table(rundir.from_json(path.read_text()))
        except (OSError, ValueError, KeyError):
            continue  # no optimum (the usual case), or one that cannot be read: the table above still stands
        name = html.escape(str(run.path.relative_to(root)) if run.path.is_relative_to(root) else str(run.path))
        blocks.append(f"<details><summary>{name}</summary><pre>{html.escape(text)}</pre></details>")
    return f"<h2>The trained policy beside pi_ref and the optimum pi*</h2>{''.join(blocks)}" if blocks else ""
