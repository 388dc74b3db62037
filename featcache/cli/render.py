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
    if per_class:
        click.echo(f"\nbest: {report['best']}; per class, from out-of-fold predictions:")
        click.echo(per_class_table(report["per_class"]))
    else:
        click.echo(f"best: {report['best']}, refit on all {report['n_images']} images")
    click.echo(f"\nmodel   {result.model_path}")
    click.echo(f"report  {result.report_path}")
    click.echo(f"matrix  {result.confusion_path}")


def echo_evaluation(source: str, ev) -> None:
    from featcache.report import per_class_table

    click.echo(f"{source}: {ev.n_images} labelled images")
    click.echo(f"accuracy  {100 * ev.accuracy:.2f} %")
    click.echo(f"macro-F1  {100 * ev.macro_f1:.2f} %")
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
        category = f"  [{p.category}]" if p.category else ""
        click.echo(f"{printable(p.path)}\t{ranked}{category}{suffix}")
