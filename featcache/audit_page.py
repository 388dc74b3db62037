"""What ``audit -o FOLDER`` writes: ``audit.jsonl`` (one finding per line) and ``index.html``, a
page that needs nothing but itself: every thumbnail is embedded, no script, no network."""

from __future__ import annotations

import base64
import html
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from featcache.audit import AuditResult, DuplicateGroup, Finding, LabelIssue, Leak, Outlier, finding_dict
from featcache.files import replaced_atomically, writable_folder

THUMBNAIL = 112
"""Longest side of a thumbnail on the page, in pixels."""
CARDS = 200
"""Cards per section of the page at most (audit.jsonl has every finding)."""
SECTIONS = (
    ("conflict", "Label conflicts", "near-duplicate images filed under different classes"),
    (
        "label_issue",
        "Label issues",
        "images whose folder the out-of-fold probabilities doubt, least likely first",
    ),
    ("duplicates", "Near-duplicates", "groups of images with almost the same embedding"),
    ("leak", "Leaks", "images of the other cache that near-duplicate a training image"),
    ("outlier", "Outliers", "images farthest from the other images of their class"),
)


@dataclass(frozen=True)
class AuditFiles:
    """The files :func:`write_audit` wrote."""

    jsonl: Path
    html: Path


def write_audit(result: AuditResult, folder: str | os.PathLike) -> AuditFiles:
    """Write ``folder/audit.jsonl`` and ``folder/index.html`` for ``result``."""
    out = writable_folder(folder)
    jsonl, page = out / "audit.jsonl", out / "index.html"
    with replaced_atomically(jsonl) as tmp:
        Path(tmp).write_text("".join(json.dumps(finding_dict(f)) + "\n" for f in result.findings()))
    with replaced_atomically(page) as tmp:
        Path(tmp).write_text(audit_html(result), encoding="utf-8")
    return AuditFiles(jsonl, page)


def audit_html(result: AuditResult) -> str:
    """The page: a summary, then one section of cards per kind of finding."""
    thumbs = _Thumbnails()
    by_kind: dict[str, list[Finding]] = {}
    for finding in result.findings():
        by_kind.setdefault(finding.kind, []).append(finding)
    parts = [
        f"<h1>featcache audit of {_e(result.features)}</h1>",
        f"<p class=summary>{result.n_images} images, {len(result.classes)} classes, under "
        f"<code>{_e(result.data_root)}</code>. Near-duplicates: cosine similarity &ge; {result.similarity}."
        + (f" Probabilities: {_e(result.probabilities)}." if result.probabilities else "")
        + "</p>",
        *(f"<p class=note>{_e(note)}</p>" for note in result.notes),
    ]
    for kind, title, what in SECTIONS:
        found = by_kind.get(kind, [])
        if kind == "leak" and result.against is None:
            continue
        parts.append(f"<section id={kind}><h2>{title} ({len(found)})</h2><p>{what}.</p><div class=cards>")
        parts += [_card(f, result, thumbs) for f in found[:CARDS]] or ["<p class=none>None found.</p>"]
        parts.append("</div>")
        if len(found) > CARDS:
            parts.append(f"<p>… and {len(found) - CARDS} more in audit.jsonl.</p>")
        parts.append("</section>")
    return PAGE.replace("{body}", "\n".join(parts))


def _card(finding: Finding, result: AuditResult, thumbs: _Thumbnails) -> str:
    root = Path(result.data_root)
    if isinstance(finding, LabelIssue):
        images = thumbs.figure(root, finding.path)
        text = (
            f"<b>{_e(finding.given)}</b> &rarr; <b>{_e(finding.suggested)}</b><br>p(given) "
            f"{finding.self_confidence:.3f}, p(suggested) {finding.suggested_probability:.3f}<br>"
            + ("confident learning" if finding.confident else "another class is likelier")
        )
    elif isinstance(finding, DuplicateGroup):
        images = "".join(
            thumbs.figure(root, p, label) for p, label in zip(finding.paths, finding.labels, strict=True)
        )
        exact = {True: "identical files", False: "not identical files", None: "a file could not be read"}
        text = (
            f"{len(finding.paths)} images, similarity &ge; {finding.similarity:.3f}, {exact[finding.exact]}"
        )
    elif isinstance(finding, Leak):
        images = thumbs.figure(
            Path(result.against_root or ""), finding.path, finding.label, "test"
        ) + thumbs.figure(root, finding.train_path, finding.train_label, "train")
        text = f"similarity {finding.similarity:.3f}{', identical files' if finding.exact else ''}"
    else:
        assert isinstance(finding, Outlier)
        images = thumbs.figure(root, finding.path)
        text = f"<b>{_e(finding.label)}</b> #{finding.rank}<br>distance {finding.score:.3f}"
    return f"<div class='card {finding.kind}'><div class=images>{images}</div><p>{text}</p></div>"


class _Thumbnails:
    """Downscaled JPEG data URIs of the images, each file read once."""

    def __init__(self) -> None:
        self.seen: dict[Path, str | None] = {}

    def figure(self, root: Path, path: str, label: str | None = None, role: str = "") -> str:
        uri = self.uri(root / path)
        caption = _e(path) + (f" <i>{_e(role)}</i>" if role else "") + (f" [{_e(label)}]" if label else "")
        if uri is None:
            missing = "<div class=missing>image missing or unreadable</div>"
            return f"<figure>{missing}<figcaption>{caption}</figcaption></figure>"
        return f"<figure><img src='{uri}' alt='{_e(path)}'><figcaption>{caption}</figcaption></figure>"

    def uri(self, file: Path) -> str | None:
        if file not in self.seen:
            self.seen[file] = _thumbnail(file)
        return self.seen[file]


def _thumbnail(file: Path) -> str | None:
    from PIL import Image

    from featcache.images import ImageError, load_image

    try:
        img = load_image(file, draft=THUMBNAIL)
    except (ImageError, OSError):
        return None
    scale = THUMBNAIL / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    img = img.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


PAGE = """<!doctype html>
<html lang=en><head><meta charset=utf-8><title>featcache audit</title>
<meta name=viewport content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
.note{color:#8a5a00}
.cards{display:flex;flex-wrap:wrap;gap:.8em}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.5em;max-width:40em}
.card.conflict{border-color:#c0392b}
.card p{margin:.3em 0 0;font-size:.85em}
.images{display:flex;gap:.4em;flex-wrap:wrap}
figure{margin:0;width:120px;font-size:.7em;word-break:break-all}
figure img{display:block;max-width:112px;max-height:112px;image-rendering:pixelated}
.missing{width:112px;height:112px;display:flex;align-items:center;justify-content:center;text-align:center;
background:#eee;color:#a00;font-size:.9em}
</style></head>
<body>
{body}
</body></html>
"""
