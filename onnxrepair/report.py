"""Shared report helpers: rich tables for evaluation results and PNG charts drawn with Pillow.

Charts need no plotting library: Pillow (already a dependency) draws simple line charts.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.table import Table

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def eval_table(report) -> Table:
    """One row per figure, one column per model (+ Δ when two models are compared)."""
    ms = report.models
    t = Table(title=f"accuracy (%) on {report.dataset or 'data'}, n={report.n}", show_lines=False)
    t.add_column("metric")
    for m in ms:
        t.add_column(f"{m.name} [{m.provider}]", justify="right")
    delta = len(ms) == 2
    if delta:
        t.add_column("Δ", justify="right")

    def row(label: str, vals: Sequence[float | None]) -> None:
        cells = [pct(v) for v in vals]
        if delta:
            cells.append("—" if None in vals else f"{100 * (vals[1] - vals[0]):+.2f}")
        t.add_row(label, *cells)

    row("clean", [m.clean for m in ms])
    if report.corruptions:
        row("mCA (mean corruption acc.)", [m.mca for m in ms])
        for c in report.corruptions:
            row(f"  {c} (mean of {len(ms[0].corruptions[c])})", [_mean(m.corruptions[c].values()) for m in ms])
    if ms[0].robustness is not None:
        row("robustness (clean + 6 blurs)", [m.robustness for m in ms])
        for s in ms[0].blur:
            row(f"  blur σ={s:g}", [m.blur[s] for m in ms])
    for a in report.attacks:
        for e in ms[0].adversarial.get(a, {}):
            row(f"{a} ε={_eps(e)}", [m.adversarial[a][e] for m in ms])
    return t


def per_class_table(report) -> Table:
    t = Table(title="per-class clean accuracy (%)")
    t.add_column("class")
    for m in report.models:
        t.add_column(m.name, justify="right")
    for c in report.models[0].per_class:
        t.add_row(c, *[pct(m.per_class.get(c)) for m in report.models])
    return t


def print_report(report, console: Console | None = None, per_class: bool = True) -> None:
    console = console or Console()
    console.print(eval_table(report))
    if per_class and len(report.models[0].per_class) <= 20:
        console.print(per_class_table(report))
    for note in report.notes:
        console.print(f"[dim]note: {note}[/dim]")


def _mean(vals) -> float | None:
    vals = list(vals)
    return sum(vals) / len(vals) if vals else None


def _eps(e: float) -> str:
    """A budget as the user would write it: 8/255 for 0.0313725..., but 0.2 as 0.2 (also 51/255: a short decimal wins)."""
    e = float(e)
    if float(f"{e:.3g}") == e:
        return f"{e:g}"
    k = e * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 and k >= 1 else f"{e:.4g}"


def fmt_value(v) -> str:
    """An option's default as it would be typed on the command line (not as Python prints it)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, float):
        return _eps(v)
    if isinstance(v, (tuple, list)):
        return ",".join(fmt_value(x) for x in v) if v else "none"
    if isinstance(v, str) and v == "":
        return '""'
    return str(v)


def _nice_step(span: float, ticks: int = 5) -> float:
    """A round tick step (1, 2, 2.5 or 5 times a power of ten) giving about ``ticks`` intervals over ``span``."""
    raw = (span or 1.0) / ticks
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)


_FONT_FILES = ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "DejaVuSans.ttf")


def _font(size: int = 12):
    """DejaVu Sans where the system has it (Pillow's built-in font renders spaces 2 px wide: "accuracy vssigma"),
    else Pillow's default at ``size``."""
    from PIL import ImageFont

    for f in _FONT_FILES:
        try:
            return ImageFont.truetype(f, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def legend_labels(names: Sequence[str], max_chars: int) -> list[str]:
    """Legend names that stay apart: a prefix every name shares is cut first ("…fixedbatch_legacy11"), then the
    middle of what is still too long, so names with a shared prefix never look alike."""
    names = [str(n) for n in names]
    if all(len(n) <= max_chars for n in names):
        return names
    pre = 0
    if len(names) > 1:
        import os.path

        pre = len(os.path.commonprefix(names))
        pre = max(0, min(pre, min(len(n) for n in names) - 4))
    out = []
    for n in names:
        n = ("…" + n[pre:]) if pre > 1 else n
        if len(n) > max_chars:
            keep = max_chars - 1
            n = n[: keep // 2] + "…" + n[len(n) - (keep - keep // 2):]
        out.append(n)
    return out


def _canvas(title: str, size: tuple[int, int], right: int = 150, subtitle: str = ""):
    """A white image with the title (and a subtitle line: data set, n) and the plot frame drawn; returns
    (image, draw, (x0, x1, y0, y1)), y0 the frame's bottom, y1 its top, with room on the right for a legend.
    The y-axis label goes between the title block and the frame (``_ylabel``), never over the title."""
    from PIL import Image, ImageDraw

    w, h = size
    left, bottom = 56, 44
    top = 62 if subtitle else 46
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.font = _font(13)
    d.text((left, 6), title, fill="black")
    if subtitle:
        d.text((left, 24), subtitle, fill=(90, 90, 90), font=_font(11))
    d.font = _font(11)
    frame = (left, w - right, h - bottom, top)
    d.rectangle([frame[0], frame[3], frame[1], frame[2]], outline="black")
    return img, d, frame


def _ylabel(d, frame, text: str) -> None:
    d.text((4, frame[3] - 16), text, fill="black")


def line_chart(path: str | Path, title: str, xs: Sequence[float], series: dict[str, Sequence[float]], *, xlabel: str = "severity", ylabel: str = "accuracy (%)",
               size=(620, 400), subtitle: str = "", xfmt=None) -> Path:
    """A small line chart (y in [0, 100]) written as PNG with Pillow; the legend is as wide as its names need
    (up to 260 px), names with a shared prefix shortened by :func:`legend_labels`."""
    labels = legend_labels(list(series), 40)
    right = min(260, max(120, 44 + 7 * max((len(n) for n in labels), default=0)))
    img, d, (x0, x1, y0, y1) = _canvas(title, size, right, subtitle)
    h, T = size[1], y1
    xmin, xmax = min(xs), max(xs)
    span = (xmax - xmin) or 1
    xfmt = xfmt or (lambda v: f"{v:g}")

    def px(x: float) -> float:
        return x0 + (x - xmin) / span * (x1 - x0)

    def py(v: float) -> float:
        return y0 - v / 100 * (y0 - y1)

    for v in range(0, 101, 20):
        d.line([x0, py(v), x1, py(v)], fill=(225, 225, 225))
        d.text((x0 - 26, py(v) - 6), f"{v}", fill="black")
    for x in xs:
        d.text((px(x) - 8, y0 + 6), xfmt(x), fill="black")
    d.text(((x0 + x1) / 2 - 3 * len(xlabel), h - 20), xlabel, fill="black")
    _ylabel(d, (x0, x1, y0, y1), ylabel)
    for i, ((name, ys), label) in enumerate(zip(series.items(), labels)):
        col = PALETTE[i % len(PALETTE)]
        pts = [(px(x), py(100 * y)) for x, y in zip(xs, ys)]
        if len(pts) > 1:
            d.line(pts, fill=col, width=2)
        for p in pts:
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=col)
        d.line([x1 + 10, T + 14 + 16 * i, x1 + 28, T + 14 + 16 * i], fill=col, width=3)
        d.text((x1 + 32, T + 7 + 16 * i), label, fill="black")
    path = Path(path)
    img.save(path)
    return path


def bar_chart(path: str | Path, title: str, groups: Sequence[str], series: dict[str, Sequence[float]], *, ylabel: str = "",
              size=(560, 380), marks: Sequence[float | None] | None = None, legend_width: int = 150) -> Path:
    """Grouped bars (one group per entry of ``groups``, one bar per series) from a zero line, negative
    values downwards; ``marks`` draws a dashed level per group (e.g. a target). Written as PNG."""
    img, d, (x0, x1, y0, y1) = _canvas(title, size, legend_width)
    vals = [v for vs in series.values() for v in vs] + [m for m in (marks or []) if m is not None]
    step = _nice_step(max(vals + [0.0]) - min(vals + [0.0]))
    lo, hi = math.floor(min(vals + [0.0]) / step) * step, math.ceil(max(vals + [0.0]) / step) * step
    lo, hi = (lo, hi) if hi > lo else (lo, lo + step)

    def py(v: float) -> float:
        return y0 - (v - lo) / (hi - lo) * (y0 - y1)

    for k in range(int(round((hi - lo) / step)) + 1):
        v = lo + k * step
        d.line([x0, py(v), x1, py(v)], fill=(225, 225, 225))
        d.text((4, py(v) - 6), f"{v:g}", fill="black")
    d.line([x0, py(0.0), x1, py(0.0)], fill="black")
    gw = (x1 - x0) / max(len(groups), 1)
    bw = gw * 0.8 / max(len(series), 1)
    for g, label in enumerate(groups):
        d.text((x0 + g * gw + gw / 2 - 3 * len(label), y0 + 6), label, fill="black")
        for i, vs in enumerate(series.values()):
            left = x0 + g * gw + gw * 0.1 + i * bw
            a, b = sorted((py(0.0), py(vs[g])))
            d.rectangle([left, a, left + bw - 2, b], fill=PALETTE[i % len(PALETTE)])
        if marks is not None and marks[g] is not None:
            for xx in range(int(x0 + g * gw + gw * 0.05), int(x0 + (g + 1) * gw - gw * 0.05), 8):
                d.line([xx, py(marks[g]), xx + 4, py(marks[g])], fill="black", width=2)
    if ylabel:
        _ylabel(d, (x0, x1, y0, y1), ylabel)
    for i, name in enumerate(legend_labels(list(series), max(8, (legend_width - 34) // 6))):
        col = PALETTE[i % len(PALETTE)]
        d.rectangle([x1 + 10, y1 + 8 + 16 * i, x1 + 24, y1 + 18 + 16 * i], fill=col)
        d.text((x1 + 30, y1 + 6 + 16 * i), name, fill="black")
    path = Path(path)
    img.save(path)
    return path


FAIRNESS_BARS = {"|SPD|": "abs_spd", "AAOD": "aaod", "|EOD|": "abs_eod", "IDR": "idr"}


def plot_fairness(models: dict[str, dict], protected: str, outdir: str | Path) -> Path:
    """|SPD|, AAOD, |EOD| and IDR per model (lower is fairer) as grouped bars: ``fairness.png``."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    series = {name: [float(m[k]) for k in FAIRNESS_BARS.values()] for name, m in models.items()}
    return bar_chart(out / "fairness.png", f"fairness w.r.t. {protected!r} (lower is fairer)", list(FAIRNESS_BARS), series)


def plot_report(report, outdir: str | Path) -> list[Path]:
    """Accuracy vs severity per corruption, vs blur σ, and vs ε per attack, for every model; the data set and n
    in each chart's subtitle. Returns the PNG paths."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    sub = f"{report.dataset or 'data'}, n={report.n}"
    for c in report.corruptions:
        sev = sorted(report.models[0].corruptions[c])
        series = {m.name: [m.clean] + [m.corruptions[c][s] for s in sev] for m in report.models}
        files.append(line_chart(out / f"{c}.png", f"{c}: accuracy vs severity (0 = clean)", [0, *sev], series, subtitle=sub))
    if report.models[0].blur:
        sig = list(report.models[0].blur)
        series = {m.name: [m.clean] + [m.blur[s] for s in sig] for m in report.models}
        files.append(line_chart(out / "deeppatch_blur.png", "Gaussian blur: accuracy vs sigma (0 = clean)", [0.0, *sig], series, xlabel="sigma",
                                subtitle=sub))
    n_adv = next((int(n.split(";")[-1].split()[0]) for n in report.notes if "images attacked" in n), report.n)
    for a in report.attacks:
        eps = sorted(report.models[0].adversarial.get(a, {}))
        if not eps:
            continue
        series = {m.name: [m.clean] + [m.adversarial[a][e] for e in eps] for m in report.models}
        files.append(line_chart(out / f"attack_{a}.png", f"{a}: accuracy vs epsilon (0 = clean)", [0.0, *eps], series, xlabel="epsilon",
                                subtitle=f"{report.dataset or 'data'}, n={n_adv} attacked (clean: n={report.n})", xfmt=lambda e: "0" if e == 0 else _eps(e)))
    return files
