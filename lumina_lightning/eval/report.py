"""Human-readable reports of an evaluation: Markdown and HTML, a per-tag bar plot and image grids.

``write_report(results, rows, out_dir)`` writes

* ``plots/tag_accuracy.png`` — per-tag accuracy (and the reference sampler's, when compared);
* ``grids/<tag>.png`` — the first images of each task, green frame = correct, red = incorrect;
* ``report.md`` — tables + the plot + the grids, with the reason of every shown failure;
* ``report.html`` — the same, each image shown with ✓/✗ and its reason.

Paths inside the reports are relative, so the output folder can be moved or logged as an artifact.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any, Sequence

from PIL import Image, ImageDraw

from lumina_lightning.data.synth import TAGS
from lumina_lightning.eval.geneval import tag_order

__all__ = ["write_report", "tag_plot", "task_grid"]

GOOD = (40, 170, 70)
BAD = (210, 40, 40)


def _tag_order(results: dict[str, Any]) -> list[str]:
    return tag_order(results.get("tags", {}))


def _table_tags(results: dict[str, Any]) -> list[str]:
    """Rows of the accuracy tables: every GenEval task (absent ones marked), then any other tag
    present, so the rows are the ones ``overall`` is the mean of."""
    return tag_order([*TAGS, *results.get("tags", {})])


def _md(text: Any) -> str:
    """``text`` for one Markdown table cell or heading: ``|`` would end the cell, a newline the row."""
    return re.sub(r"\s*[\r\n]+\s*", "; ", str(text)).replace("|", "\\|")


def _grid_name(tag: str, taken: set[str]) -> str:
    """A file name for ``tag``'s grid: the tag is data (``../x`` would leave ``grids/``), so only
    ``[A-Za-z0-9_.-]`` is kept, without a leading dot, and a clash gets a number."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", tag).lstrip(".") or "tag"
    name, n = f"{stem}.png", 1
    while name in taken:
        n += 1
        name = f"{stem}_{n}.png"
    taken.add(name)
    return name


def tag_plot(results: dict[str, Any], path: Path) -> Path:
    """Bar plot of per-tag accuracy (absent tags marked), with the overall score as a line."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = list(TAGS) + [t for t in results.get("tags", {}) if t not in TAGS]
    values = [results["tags"].get(t) for t in names]
    ref = (results.get("compare") or {}).get("reference_tags")
    fig, ax = plt.subplots(figsize=(7.5, 3.6), dpi=100)
    xs = list(range(len(names)))
    width = 0.4 if ref else 0.7
    shift = -width / 2 if ref else 0.0
    ax.bar([x + shift for x in xs], [v or 0.0 for v in values], width=width, color="#3b6fb6",
           label=results.get("settings", {}).get("preset", "model"))
    cis = [_interval(results, t) for t in names]
    ci_x = [x + shift for x, v, iv in zip(xs, values, cis) if v is not None and iv]
    if ci_x:
        low = [v - iv[0] for v, iv in zip(values, cis) if v is not None and iv]
        high = [iv[1] - v for v, iv in zip(values, cis) if v is not None and iv]
        ax.errorbar(ci_x, [v for v, iv in zip(values, cis) if v is not None and iv], yerr=[low, high],
                    fmt="none", ecolor="#222222", elinewidth=1, capsize=3, label="95 % interval")
    blind = [(x + shift, _blind(results, t)) for x, t in zip(xs, names) if _blind(results, t) is not None]
    if blind:
        ax.scatter([b[0] for b in blind], [b[1] for b in blind], marker="_", s=900, linewidths=2.5, color="#d22828",
                   zorder=3, label="prompt-blind (chance)")
    if ref:
        ax.bar([x + width / 2 for x in xs], [ref.get(t) or 0.0 for t in names], width=width, color="#aaaaaa",
               label=f"reference ({results['compare']['reference_preset']})")
    for x, v in zip(xs, values):
        # beside the interval bar, not on it
        ax.text(x + shift + width * 0.08, (v or 0.0) + 0.02, "absent" if v is None else f"{v:.2f}", ha="left",
                fontsize=8)
    if results.get("overall") is not None:
        ax.axhline(results["overall"], color="#777777", linestyle="--", linewidth=1,
                   label=f"overall {results['overall']:.3f}")
    ax.set_xticks(xs)
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("accuracy")
    ax.set_title("GenEval-lite accuracy per task")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def task_grid(images: Sequence[Image.Image], correct: Sequence[bool], path: Path, *, cols: int = 8,
              tile: int = 96, border: int = 4) -> Path:
    """A grid of images upscaled (nearest) to ``tile`` px, framed green (correct) or red."""
    cols = max(1, min(cols, len(images)))
    rows = (len(images) + cols - 1) // cols
    cell = tile + 2 * border
    canvas = Image.new("RGB", (cols * cell + (cols - 1) * 2, rows * cell + (rows - 1) * 2), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for n, (img, ok) in enumerate(zip(images, correct)):
        x, y = (n % cols) * (cell + 2), (n // cols) * (cell + 2)
        draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=GOOD if ok else BAD)
        scale = tile / max(img.size)
        shown = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.NEAREST)
        canvas.paste(shown, (x + border + (tile - shown.width) // 2, y + border + (tile - shown.height) // 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _interval(results: dict[str, Any], tag: str | None = None) -> list[float] | None:
    ci = results.get("ci95") or {}
    return ci.get("overall") if tag is None else (ci.get("tags") or {}).get(tag)


def _fmt_ci(iv: list[float] | None) -> str:
    return "–" if not iv else f"{iv[0]:.2f}–{iv[1]:.2f}"


def val_loss_text(vl: dict[str, Any]) -> str:
    """The validation loss as one line: the mean, then the loss at each timestep.

    The per-timestep losses say *where* a model is weak: the tiny pipeline's scattered patches are a
    mid-t denoising failure, read at t ≈ 0.4 (docs/tiny_pipeline_experiments.md: "Where the scatter
    comes from").
    """
    per_t = " · ".join(f"{t:.2f}: {v:.4f}" for t, v in zip(vl["timesteps"], vl["per_t"]))
    return (f"{vl['mean']:.5f} ({vl['records']} records, caption level {vl['caption_level']}); "
            f"per t (0 = noise): {per_t}")


def undersized_text(u: dict[str, Any]) -> str:
    """:func:`~lumina_lightning.eval.metrics.undersized_credits` as one line."""
    if not u.get("correct"):
        return "no correct images"
    per = ", ".join(f"{tag} {t['undersized']}/{t['correct']}" for tag, t in u["tags"].items() if t["correct"])
    return (f"{u['undersized']} of {u['correct']} correct images ({u['share']:.0%}) were credited on objects smaller "
            f"than any ground-truth object of their task at this size ({per}); counted as failures, the overall "
            f"score would be {u['overall_without']:.3f}")


def _blind(results: dict[str, Any], tag: str | None = None) -> float | None:
    pb = results.get("prompt_blind") or {}
    return pb.get("overall") if tag is None else (pb.get("tags") or {}).get(tag)


def _summary_lines(results: dict[str, Any]) -> list[tuple[str, str]]:
    s = results.get("settings", {})
    lines = [
        ("checkpoint", str(results.get("checkpoint") or "(in-memory pipeline)")),
        ("prompts", f"{results.get('prompts_file')} ({results.get('prompts')} prompts, {results.get('images')} images)"),
        ("sampler", f"preset {s.get('preset')}: {s.get('solver')} × {s.get('steps')} steps, shift {s.get('shift')}, "
                    f"CFG {s.get('cfg_scale')}, renorm {s.get('renorm')}, cfg_trunc {s.get('cfg_trunc')}, "
                    f"TeaCache {s.get('teacache')}"),
        ("size / seed", f"{s.get('width')}×{s.get('height')}, {s.get('images_per_prompt')} images per prompt, "
                        f"seed {s.get('seed')}"),
        ("timings", ", ".join(f"{k} {_fmt(v, 2)}" for k, v in results.get("timings", {}).items())),
    ]
    dv = results.get("detector_validation")
    if dv:
        at = f" at {dv['size'][0]}×{dv['size'][1]}" if dv.get("resized") else ""
        native = dv.get("native")
        native_text = (f"; at the renders' native size {_fmt(native['overall'])} overall, min tag "
                       f"{_fmt(native['min_tag'])}" if native else "")
        recon = dv.get("autoencoder")
        if recon:
            native_text += (f"; through the model's autoencoder {_fmt(recon['overall'])} overall, min tag "
                            f"{_fmt(recon['min_tag'])}")
        lines.append(("detector on ground truth", f"{_fmt(dv['overall'])} overall{at}, min tag {_fmt(dv['min_tag'])} "
                      f"({'passes' if dv['passed'] else 'FAILS'} the {dv['target']} bar; {dv['images']} images"
                      f"{native_text})"))
    if results.get("undersized"):
        lines.append(("undersized credits", undersized_text(results["undersized"])))
    vl = results.get("val_loss")
    if vl:
        lines.append(("validation loss", val_loss_text(vl)))
    pr = results.get("paired")
    if pr:
        text = ("no images in common" if pr.get("difference") is None else
                f"{pr['difference']:+.3f} [{pr['interval'][0]:+.3f}, {pr['interval'][1]:+.3f}] over {pr['pairs']} "
                "paired images")
        lines.append((f"this run − {pr['with']}", text))
    cmp_ = results.get("compare")
    if cmp_:
        lines.append(("vs reference", f"{cmp_['reference_preset']}: PSNR {cmp_['psnr']:.2f} dB, SSIM {cmp_['ssim']:.4f}, "
                      f"reference overall {_fmt(cmp_['reference_overall'])} (delta {_fmt(cmp_['overall_delta'])}), "
                      f"speed-up {_fmt(cmp_['speedup'], 2)}×"))
    return lines


def _by_tag(rows: Sequence[dict[str, Any]], max_per_task: int) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        items = out.setdefault(row["tag"], [])
        if len(items) < max_per_task:
            items.append(row)
    return out


def write_report(results: dict[str, Any], rows: Sequence[dict[str, Any]], out_dir: str | Path, *,
                 max_per_task: int = 24) -> dict[str, Any]:
    """Write the plot, the grids, ``report.md`` and ``report.html``; returns their relative paths."""
    out = Path(out_dir)
    files: dict[str, Any] = {"report_md": "report.md", "report_html": "report.html",
                             "plot": "plots/tag_accuracy.png", "grids": {}}
    tag_plot(results, out / files["plot"])
    shown = _by_tag(rows, max_per_task)
    # a rerun into the same folder must not leave (and log to MLflow) a grid of a task it no longer has
    for stale in (out / "grids").glob("*.png"):
        stale.unlink()
    taken: set[str] = set()
    for tag in _tag_order(results):
        items = shown.get(tag, [])
        if not items:
            continue
        images = []
        for row in items:
            with Image.open(out / row["filename"]) as im:
                images.append(im.convert("RGB"))
        rel = f"grids/{_grid_name(tag, taken)}"
        task_grid(images, [r["correct"] for r in items], out / rel)
        files["grids"][tag] = rel

    # -- Markdown --------------------------------------------------------------------------------------
    md = ["# Mini-GenEval report", ""]
    md += [f"- **{k}**: {v}" for k, v in _summary_lines(results)]
    md += ["", "## Accuracy per task", "",
           "95 % interval: bootstrap over prompts, then each prompt's accuracy from its Jeffreys "
           "posterior. Prompt-blind: the score of a model that draws a random correct scene of the task "
           "whatever the prompt (ground-truth renders), i.e. the chance level.", "",
           "| task | accuracy | 95 % interval | correct / images | prompt-blind |", "|---|---:|---:|---:|---:|"]
    for tag in _table_tags(results):
        if tag in results["tags"]:
            c, n = results["counts"][tag]
            md.append(f"| {_md(tag)} | {results['tags'][tag]:.3f} | {_fmt_ci(_interval(results, tag))} | {c} / {n} | "
                      f"{_fmt(_blind(results, tag))} |")
        else:
            md.append(f"| {tag} | absent | – | – | – |")
    md += [f"| **overall** (mean of present tasks) | **{_fmt(results.get('overall'))}** | "
           f"{_fmt_ci(_interval(results))} | | {_fmt(_blind(results))} |", "",
           f"![accuracy per task]({files['plot']})", ""]
    dv = results.get("detector_validation")
    if dv:
        native = dv.get("native")
        at = f" at {dv['size'][0]}×{dv['size'][1]} (the evaluated size: the ceiling of the model's score)" \
            if dv.get("resized") else ""
        md += [f"## Detector on ground-truth renders{at}", ""]
        # extra columns: the renders at their native size, and passed through a latent model's autoencoder
        extra = [(label, part["tags"]) for label, part in (("at native size", native),
                                                          ("through the autoencoder", dv.get("autoencoder"))) if part]
        md += ["| task | accuracy |" + "".join(f" {label} |" for label, _ in extra),
               "|---|---:|" + "---:|" * len(extra)]
        md += [f"| {_md(t)} | {v:.3f} |" + "".join(f" {tags.get(t, float('nan')):.3f} |" for _, tags in extra)
               for t, v in dv["tags"].items()]
        boxes = native or dv  # boxes are matched in the renders' own coordinates
        md += ["", f"Object recall {_fmt(boxes.get('object_recall'))}, precision {_fmt(boxes.get('object_precision'))}"
                   f"{' (native size)' if native else ''}, {_fmt(dv.get('ms_per_image'), 2)} ms per image.", ""]
    for tag in _tag_order(results):
        if tag not in files["grids"]:
            continue
        md += [f"## {_md(tag)}", "", f"![{_md(tag).replace('[', '(').replace(']', ')')}]({files['grids'][tag]})", "",
               "Green frame = correct, red = incorrect (left to right, top to bottom).", "",
               "| # | prompt | result | reason |", "|---:|---|---|---|"]
        for n, row in enumerate(shown[tag]):
            md.append(f"| {n} | {_md(row['prompt'])} | {'✓' if row['correct'] else '✗'} | {_md(row['reason'])} |")
        md.append("")
    (out / files["report_md"]).write_text("\n".join(md) + "\n", encoding="utf-8")

    # -- HTML ------------------------------------------------------------------------------------------
    e = html.escape
    h = ["<!doctype html>", "<html><head><meta charset='utf-8'><title>Mini-GenEval report</title>",
         "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:3px 8px}figure{display:inline-block;margin:4px;width:128px;"
         "vertical-align:top;font-size:11px}figure img{width:120px;height:auto;image-rendering:pixelated;border:4px solid}"
         ".ok img{border-color:#28aa46}.bad img{border-color:#d22828}.ok b{color:#28aa46}.bad b{color:#d22828}"
         "figcaption{word-wrap:break-word}</style></head><body>", "<h1>Mini-GenEval report</h1>", "<ul>"]
    h += [f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in _summary_lines(results)]
    h += ["</ul>", "<h2>Accuracy per task</h2>",
          "<p>95 % interval: bootstrap over prompts, then each prompt's accuracy from its Jeffreys posterior. "
          "Prompt-blind: the chance level (a random correct scene of the task, whatever the prompt).</p>",
          "<table><tr><th>task</th><th>accuracy</th><th>95 % interval</th><th>correct / images</th>"
          "<th>prompt-blind</th></tr>"]
    for tag in _table_tags(results):
        if tag in results["tags"]:
            c, n = results["counts"][tag]
            h.append(f"<tr><td>{e(tag)}</td><td>{results['tags'][tag]:.3f}</td><td>{_fmt_ci(_interval(results, tag))}</td>"
                     f"<td>{c} / {n}</td><td>{_fmt(_blind(results, tag))}</td></tr>")
        else:
            h.append(f"<tr><td>{tag}</td><td>absent</td><td>–</td><td>–</td><td>–</td></tr>")
    h += [f"<tr><th>overall</th><th>{_fmt(results.get('overall'))}</th><td>{_fmt_ci(_interval(results))}</td>"
          f"<td>mean of present tasks</td><td>{_fmt(_blind(results))}</td></tr></table>",
          f"<p><img src='{files['plot']}' alt='accuracy per task'></p>"]
    if dv:
        h += ["<h2>Detector on ground-truth renders</h2><table><tr><th>task</th><th>accuracy</th></tr>"]
        h += [f"<tr><td>{e(t)}</td><td>{v:.3f}</td></tr>" for t, v in dv["tags"].items()]
        h += ["</table>"]
    for tag in _tag_order(results):
        if tag not in shown:
            continue
        h.append(f"<h2>{e(tag)}</h2><div>")
        for row in shown[tag]:
            ok = row["correct"]
            reason = row["reason"] or "all checks passed"
            dets = ", ".join(f"{d['color']} {d['class']} {d['score']:.2f}" for d in row.get("detections", [])) or "nothing"
            h.append(f"<figure class='{'ok' if ok else 'bad'}'><img src='{e(row['filename'])}' "
                     f"title='{e(json.dumps(row.get('detections', [])))}'><figcaption><b>{'✓' if ok else '✗'}</b> "
                     f"{e(row['prompt'])}<br><i>{e(reason)}</i><br>detected: {e(dets)}</figcaption></figure>")
        h.append("</div>")
    h.append("</body></html>")
    (out / files["report_html"]).write_text("\n".join(h) + "\n", encoding="utf-8")
    return files
