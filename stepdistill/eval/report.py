"""``report.json`` (schema below, also written as ``report.schema.json``), ``report.md`` (the table) and
``report.html`` (table, FID-vs-NFE and quality-vs-ms plots, sample grids; images embedded, readable offline).

One row per sampler configuration. Metrics that do not apply are null: FID / precision / recall need a
feature space and reference set, ``clip_score`` prompts and a CLIP model, ``condition_accuracy`` digit
conditions and the classifier, speed a sampler; ``sw2`` / ``modes_covered`` / ``on_mode`` are toy2d's.
``settings.missing_metrics`` says, per metric the evaluation could not compute, why and which flag enables it.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FORMAT = "stepdistill.eval.report/1"


class ReportRow(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str = Field(description="row label, e.g. 'teacher DDIM-4' or a run name")
    method: str = Field(description="'teacher', 'images', or the training method of a student (dmd, tscd ...)")
    model: str | None = Field(None, description="what was sampled: asset, folder or run directory")
    scheduler: str | None = Field(None, description="Diffusers scheduler class")
    steps: int | None = Field(None, description="sampling steps")
    guidance_scale: float | None = Field(None, description="classifier-free guidance scale; null: none")
    eta: float | None = None
    nfe: float | None = Field(None, description="network evaluations per image, counted (CFG counts twice)")
    num_samples: int | None = None
    fid: float | None = Field(None, description="Fréchet distance to the reference set in the benchmark's features")
    precision: float | None = Field(None, description="improved precision (Kynkäänniemi et al. 2019, k=3)")
    recall: float | None = Field(None, description="improved recall (k=3)")
    clip_score: float | None = Field(None, description="mean 100 * max(cos(image, prompt), 0), open_clip")
    condition_accuracy: float | None = Field(None, description="share classified as the requested digit")
    diversity: float | None = Field(None, description="mean pairwise cosine distance of features within a condition")
    ms_per_image: float | None = Field(None, description="milliseconds per image at batch_size: the median over timing "
                                                        "rounds interleaved with the report's other rows")
    ms_spread: float | None = Field(None, description="slowest minus fastest timing round, ms per image")
    speed_batches: int | None = Field(None, description="timed batches behind ms_per_image")
    images_per_s: float | None = Field(None, description="1000 / ms_per_image")
    peak_mem_mb: float | None = Field(None, description="peak memory during generation (see settings.mem_kind)")
    batch_size: int | None = None
    sw2: float | None = Field(None, description="toy2d: sliced Wasserstein-2 distance to true samples")
    modes_covered: int | None = Field(None, description="toy2d: modes covered")
    num_modes: int | None = None
    on_mode: float | None = Field(None, description="toy2d: share of samples within 3 std of a mode")
    grid: str | None = Field(None, description="sample grid PNG, relative to the report folder")
    x0_grid: str | None = Field(None, description="decoded x0-prediction at every step (one column per step, one "
                                                  "row per sample) PNG, relative to the report folder")
    x0_timesteps: list[int] | None = Field(None, description="per step of the x0 grid: its timestep")
    x0_models: list[str] | None = Field(None, description="per step: the network of the plan that made it "
                                                          "(teacher, student, an expert ...)")
    x0_distance: list[float] | None = Field(None, description="per step: mean cosine feature distance of the x0 "
                                                              "to the final image")
    settle_step: int | None = Field(None, description="first step (1-based) from which every x0 is within 0.05 "
                                                      "feature distance of the final image: the layout is fixed")
    part: str | None = Field(None, description="a routed student's part: this row scores only the samples of the "
                                               "conditions that student owns (FID against the reference images the "
                                               "benchmark classifier assigns to those classes)")


class Report(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["stepdistill.eval.report/1"] = FORMAT
    created: str
    settings: dict[str, Any] = Field(default_factory=dict)
    rows: list[ReportRow]


ROW_FIELDS = list(ReportRow.model_fields)
TABLE = ["name", "method", "steps", "nfe", "fid", "precision", "recall", "clip_score", "condition_accuracy",
         "diversity", "ms_per_image", "ms_spread", "images_per_s", "peak_mem_mb"]
TOY = ["sw2", "modes_covered", "on_mode"]


def write_report(rows: list[dict], out_dir: Path, settings: dict | None = None) -> Report:
    """Validate ``rows`` and write report.json / report.schema.json / report.md / report.html + plots."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = Report(created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    settings=settings or {}, rows=[ReportRow(**r) for r in rows])
    (out_dir / "report.json").write_text(json.dumps(report.model_dump(mode="json"), indent=2) + "\n")
    (out_dir / "report.schema.json").write_text(json.dumps(Report.model_json_schema(), indent=2) + "\n")
    (out_dir / "report.md").write_text(markdown(report))
    plots = write_plots(report, out_dir)
    (out_dir / "report.html").write_text(to_html(report, out_dir, plots))
    return report


def load_report(path: str | Path) -> Report:
    return Report.model_validate_json(Path(path).read_text())


# ---- table -------------------------------------------------------------------------------------------
def _columns(report: Report) -> list[str]:
    cols = list(TABLE)
    if any(r.sw2 is not None for r in report.rows):
        cols += TOY
    if any(r.settle_step is not None for r in report.rows):
        cols.append("settle_step")
    return cols


def fmt(v) -> str:
    if v is None:
        return "—"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown(report: Report) -> str:
    cols = _columns(report)
    lines = [f"# stepdistill eval — {report.settings.get('benchmark', '')}", ""]
    for k, v in report.settings.items():  # a dict (e.g. missing_metrics: metric -> why) as a nested list
        lines += [f"- {k}:", *(f"  - {a}: {b}" for a, b in v.items())] if isinstance(v, dict) else [f"- {k}: {v}"]
    lines.append("")
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for r in report.rows:
        d = r.model_dump()
        lines.append("| " + " | ".join(fmt(d[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


# ---- plots -------------------------------------------------------------------------------------------
def _quality(report: Report) -> tuple[str | None, str]:
    if any(r.fid is not None for r in report.rows):
        return "fid", "FID (lower is better)"
    if any(r.sw2 is not None for r in report.rows):
        return "sw2", "sliced W2 (lower is better)"
    return None, ""


def write_plots(report: Report, out_dir: Path) -> dict[str, str]:
    """FID (or toy sliced W2) against NFE and against ms/image, one line / colour per method and model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, label = _quality(report)
    if key is None:
        return {}
    groups: dict[str, list[ReportRow]] = {}
    for r in report.rows:
        if getattr(r, key) is not None:
            groups.setdefault(f"{r.method} · {Path(r.model or '').name or r.model}", []).append(r)
    out = {}
    for name, xkey, xlabel in (("fid_vs_nfe", "nfe", "NFE (network evaluations per image)"),
                               ("quality_vs_ms", "ms_per_image", "ms per image")):
        fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=100)
        drawn = False
        for g, rows in groups.items():
            pts = sorted((getattr(r, xkey), getattr(r, key), r.name) for r in rows if getattr(r, xkey) is not None)
            if not pts:
                continue
            xs, ys, names = zip(*pts)
            ax.plot(xs, ys, marker="o", label=g)
            for x, y, n in pts:
                ax.annotate(str(next((r.steps for r in rows if r.name == n), "")), (x, y), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
            drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"{label.split(' (')[0]} vs {xlabel.split(' (')[0]} (labels: steps)", fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / f"{name}.png")
        plt.close(fig)
        out[name] = f"{name}.png"
    return out


# ---- html --------------------------------------------------------------------------------------------
def _x0_caption(r: ReportRow) -> str:
    parts = [r.name]
    if r.x0_timesteps:
        parts.append("t " + " ".join(map(str, r.x0_timesteps)))
    if r.x0_models and len(set(r.x0_models)) > 1:
        parts.append("networks " + " ".join(r.x0_models))
    if r.x0_distance:
        parts.append("distance to final " + " ".join(f"{d:.2f}" for d in r.x0_distance))
    if r.settle_step is not None:
        parts.append(f"settles at step {r.settle_step}/{len(r.x0_distance or [])}")
    return " · ".join(parts)


def _img(out_dir: Path, rel: str, alt: str) -> str:
    data = base64.b64encode((out_dir / rel).read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" title="{html.escape(rel)}">'


def _setting_html(value) -> str:
    if isinstance(value, dict):  # e.g. missing_metrics: metric -> why
        return "<ul>" + "".join(f"<li>{html.escape(str(k))}: {html.escape(str(v))}</li>"
                                for k, v in value.items()) + "</ul>"
    return html.escape(str(value))


def to_html(report: Report, out_dir: Path, plots: dict[str, str]) -> str:
    cols = _columns(report)
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{esc(fmt(r.model_dump()[c]))}</td>" for c in cols) + "</tr>"
                   for r in report.rows)
    settings = "".join(f"<li><b>{esc(str(k))}</b>: {_setting_html(v)}</li>" for k, v in report.settings.items())
    figs = "".join(f"<figure>{_img(out_dir, p, n)}<figcaption>{esc(n)}</figcaption></figure>"
                   for n, p in plots.items())
    grids = "".join(f"<figure>{_img(out_dir, r.grid, r.name)}<figcaption>{esc(r.name)}</figcaption></figure>"
                    for r in report.rows if r.grid and (out_dir / r.grid).exists())
    x0 = "".join(f"<figure>{_img(out_dir, r.x0_grid, r.name)}<figcaption>{esc(_x0_caption(r))}</figcaption></figure>"
                 for r in report.rows if r.x0_grid and (out_dir / r.x0_grid).exists())
    if x0:
        grids += ("<h2>x0 at every step</h2><p>One column per step (left: first), one row per sample; the "
                  "distance of each step's x0 to the final image (classifier features) shows when the layout "
                  f"settles.</p>{x0}")
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td:first-child,td:nth-child(2)"
             "{text-align:left}figure{display:inline-block;margin:8px;vertical-align:top}"
             "figcaption{font-size:12px;text-align:center}img{image-rendering:pixelated}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>stepdistill eval</title><style>{style}"
            f"</style></head><body><h1>stepdistill eval — {esc(str(report.settings.get('benchmark', '')))}</h1>"
            f"<p>{esc(report.created)}</p><ul>{settings}</ul><table><tr>{head}</tr>{body}</table>"
            f"<h2>Plots</h2>{figs or '<p>no quality metric to plot</p>'}<h2>Samples</h2>{grids}</body></html>\n")
