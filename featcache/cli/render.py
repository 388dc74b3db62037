"""How results are written for people: one place for the lines every command prints."""

from __future__ import annotations

import json

import click


def printable(path: str) -> str:
    """``path`` with bytes that are not UTF-8 shown as escapes."""
    return path.encode("utf-8", "backslashreplace").decode("utf-8")


def echo_layers(entry) -> None:
    size = entry.preprocessing.size
    click.echo(f"{entry.name}: layers for --layers (each is pooled, then they are concatenated)")
    click.echo(f"  {'stage':>5}  {'module':<14} {'channels':>8}  output at {size}x{size}")
    for i, stage in enumerate(entry.stages):
        side = -(-size // stage.reduction)
        click.echo(f"  {i:>5}  {stage.module:<14} {stage.channels:>8}  {side}x{side}")
    click.echo(f"  {'last':>5}  {'(features)':<14} {entry.feature_dim:>8}  the layer the classifier pools")
    click.echo(f"  multi = {entry.multi}: {entry.layers_dim(entry.multi)} channels")
    example = ",".join([*(str(i) for i in range(max(0, len(entry.stages) - 2), len(entry.stages))), "last"])
    if entry.stages:
        click.echo(f"  e.g. --layers {example}")


def echo_extract(result) -> None:
    ident = result.identity
    click.echo(
        f"{result.output}: {result.n_images} images, {ident.backbone} ({ident.weights}), "
        f"{ident.feature_dim}-d {ident.pool}-pooled"
        f"{'' if ident.layers == 'last' else f' layers {ident.layers}'}"
        f"{'' if ident.maps is None else f' + maps of stage {ident.maps}'}, "
        f"{ident.precision} on {result.engine}; "
        f"computed {result.n_computed}, "
        f"reused {result.n_reused}, removed {result.n_removed} in {result.seconds:.1f} s"
        + ("" if result.written else " (unchanged)")
        + (f"; {result.shards} shard(s) on a Dask cluster" if result.shards else "")
    )
    for note in result.notes:
        click.echo(f"note: {note}")
    if result.skipped:
        click.echo(f"skipped {len(result.skipped)} file(s):", err=True)
        for path, reason in result.skipped[:20]:
            click.echo(f"  {printable(path)}: {reason}", err=True)
        if len(result.skipped) > 20:
            click.echo(
                f"  ... and {len(result.skipped) - 20} more ('featcache info --skipped' lists all)", err=True
            )


def echo_fit(result, per_class: bool = True) -> None:
    from featcache.report import families_table, per_class_table

    report = result.report
    click.echo(f"{report['n_images']} images, {report['n_classes']} classes, {report['cv']}-fold CV "
               f"(seed {report['seed']})")  # fmt: skip
    click.echo(families_table(report))
    for line in fit_notes(report):
        click.echo(line)
    if per_class:
        click.echo(f"\nbest: {report['best']}; per class, from out-of-fold predictions:")
        click.echo(per_class_table(report["per_class"]))
    else:
        click.echo(f"best: {report['best']}, refit on all {report['n_images']} images")
    click.echo(f"\nmodel   {result.model_path}")
    click.echo(f"report  {result.report_path}")
    click.echo(f"matrix  {result.confusion_path}")
    click.echo(f"oof     {result.model_path.parent / 'oof.npz'}  (out-of-fold probabilities)")
    folder = result.model_path.parent
    click.echo(f"        featcache plot --calibration {folder}  # their reliability diagram")


def fit_notes(report: dict) -> list[str]:
    """The lines under the families table: corrections, near-duplicates, calibration, the
    unknown-image threshold."""
    lines = []
    fixed = report.get("corrections")
    if fixed:
        lines.append(f"corrections ({', '.join(fixed['files'])}): {fixed['relabelled']} images relabelled, "
                     f"{fixed['excluded']} left out")  # fmt: skip
    dup = report.get("duplicates", {})
    if dup.get("groups"):
        lines.append(
            f"near-duplicates: {dup['rows']} images in {dup['groups']} groups, each kept in one fold"
        )
        if "without_grouping" in dup and abs(dup["with_grouping"] - dup["without_grouping"]) > 0.005:
            metric = dup["metric"].replace("_", " ")
            grouped, split = 100 * dup["with_grouping"], 100 * dup["without_grouping"]
            lines.append(f"  CV {metric} {grouped:.2f} % with them grouped, {split:.2f} % split across folds")
    cal = report.get("calibration")
    if cal:
        if cal["margins"]:
            lines.append(f"calibration: ECE {cal['ece']:.3f} out of fold (margins made probabilities by "
                         f"temperature scaling, beta {cal['temperature_beta']:.3g})")  # fmt: skip
        elif cal["scaled"]:
            lines.append(f"calibration: ECE {cal['ece_before']:.3f} -> {cal['ece']:.3f} out of fold "
                         f"(temperature scaling, beta {cal['temperature_beta']:.3g})")  # fmt: skip
        elif cal.get("temperature_tried") is not None:
            lines.append(f"calibration: ECE {cal['ece']:.3f} out of fold (temperature scaling would not "
                         "lower it: not scaled)")  # fmt: skip
        else:
            lines.append(f"calibration: ECE {cal['ece']:.3f} out of fold (no scaling needed)")
    ood = report.get("outliers")
    if ood:
        lines.append(f"unknown images: ood_score above {ood['threshold']:.3f} "
                     f"(keeps {100 * ood['keep']:.0f} % of the training images, out of fold)")  # fmt: skip
    return lines


def echo_evaluation(source: str, ev) -> None:
    from featcache.report import per_class_table

    click.echo(f"{source}: {ev.n_images} labelled images")
    click.echo(f"accuracy  {100 * ev.accuracy:.2f} %")
    click.echo(f"macro-F1  {100 * ev.macro_f1:.2f} %")
    if ev.coverage is not None:
        covered = "n/a" if ev.covered_accuracy is None else f"{100 * ev.covered_accuracy:.2f} %"
        click.echo(f"coverage  {100 * ev.coverage:.2f} % answered, {sum(ev.unknown)} unknown; "
                   f"accuracy on the answered {covered}")  # fmt: skip
    click.echo(per_class_table(ev.per_class))
    if ev.skipped:
        click.echo(f"skipped {len(ev.skipped)} unreadable file(s)", err=True)


def echo_prediction(p, as_json: bool = False, suffix: str = "") -> None:
    if as_json:
        click.echo(json.dumps({**p.to_dict(), "path": printable(p.path)}, ensure_ascii=False))
    elif p.error is not None:
        click.echo(f"error: {printable(p.path)}: {p.error}", err=True)
    else:
        ranked = "  ".join(f"{label} {100 * prob:.1f}%" for label, prob in p.top_k)
        if p.unknown:
            ranked = f"unknown (closest: {p.label} {100 * p.probability:.0f} %)"
        category = f"  [{p.category}]" if p.category and not p.unknown else ""
        click.echo(f"{printable(p.path)}\t{ranked}{category}{suffix}")


def echo_audit(result, top: int = 10) -> None:
    """The audit summary: counts per kind and per class, then the first ``top`` of each kind."""
    click.echo(f"audit of {result.features}: {result.n_images} images, {len(result.classes)} classes "
               f"({printable(result.data_root)})")  # fmt: skip
    conflicts = [g for g in result.duplicates if g.conflict]
    groups = [g for g in result.duplicates if not g.conflict]
    counts = [
        ("label conflicts", f"{len(conflicts)} groups ({sum(len(g.paths) for g in conflicts)} images)"),
        ("label issues", str(len(result.label_issues))),
        ("near-duplicates", f"{len(groups)} groups ({sum(len(g.paths) for g in groups)} images), "
                            f"cosine >= {result.similarity}"),
        ("leaks", f"{len(result.leaks)} of the {result.against_images} images of {result.against}"
         if result.against else "- (--against OTHER.h5 to look for them)"),
        ("outliers", str(len(result.outliers))),
    ]  # fmt: skip
    for kind, text in counts:
        click.echo(f"  {kind:<16} {text}")
    if result.probabilities:
        click.echo(f"label issues from: {result.probabilities}")
    for note in result.notes:
        click.echo(f"note: {note}")
    table = result.per_class()
    if table:
        width = max(5, *(len(c) for c in table))
        header = f"{'images':>6}  {'label issues':>12}  {'in duplicates':>13}  {'outliers':>8}"
        click.echo(f"\n  {'class':<{width}}  {header}")
        for folder, row in table.items():
            click.echo(f"  {folder:<{width}}  {row['images']:>6}  {row['label_issues']:>12}  "
                       f"{row['in_duplicates']:>13}  {row['outliers']:>8}")  # fmt: skip
    sections = [
        ("label conflicts", conflicts, _group_line),
        ("label issues", result.label_issues,
         lambda i: f"{printable(i.path)}: {i.given} -> {i.suggested} (p(given) {i.self_confidence:.3f})"),
        ("near-duplicates", groups, _group_line),
        ("leaks", result.leaks,
         lambda k: f"{_labelled(k.path, k.label)} ~ {_labelled(k.train_path, k.train_label)}, "
                   f"similarity {k.similarity:.3f}{' (identical files)' if k.exact else ''}"),
        ("outliers", result.outliers, lambda o: f"{printable(o.path)} [{o.label}]: distance {o.score:.3f}"),
    ]  # fmt: skip
    for title, found, line in sections:
        if found:
            click.echo(f"\n{title} ({'all ' if len(found) <= top else f'first {top} of '}{len(found)}):")
            for finding in found[:top]:
                click.echo(f"  {line(finding)}")


def _group_line(group) -> str:
    members = ", ".join(_labelled(p, label) for p, label in zip(group.paths, group.labels, strict=True))
    exact = " identical files" if group.exact else ""
    return f"{len(group.paths)} images, similarity >= {group.similarity:.3f}{exact}: {members}"


def _labelled(path: str, label: str | None) -> str:
    """A path with its class folder in brackets (none for an unlabelled image)."""
    return printable(path) + ("" if label is None else f" [{label}]")
