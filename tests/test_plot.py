"""`featcache plot`: a 2-D map of a feature cache."""

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import synthetic_cache
from PIL import Image

from featcache.cache import read_cache, write_cache
from featcache.cli import cli
from featcache.errors import FeatcacheError
from featcache.report import embed_2d, plot_embedding


def _one_nn_accuracy(points, labels):
    d = ((points[:, None] - points[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return float((labels[d.argmin(1)] == labels).mean())


@pytest.mark.parametrize("method", ["tsne", "pca"])
def test_map_keeps_separate_classes_apart(tmp_path, method):
    cache = read_cache(synthetic_cache(tmp_path / "f.h5", separation=4.0, n_classes=5, dim=64))
    points = embed_2d(cache.features, method)
    assert points.shape == (len(cache), 2) and np.isfinite(points).all()
    assert _one_nn_accuracy(points, cache.labels) >= 0.95
    shuffled = read_cache(synthetic_cache(tmp_path / "s.h5", separation=4.0, n_classes=5, dim=64,
                                          shuffle_labels=True))  # fmt: skip
    assert _one_nn_accuracy(embed_2d(shuffled.features, method), shuffled.labels) < 0.5
    assert np.array_equal(points, embed_2d(cache.features, method))  # seeded


def test_embed_2d_rejects_bad_input():
    with pytest.raises(ValueError, match="tsne, pca"):
        embed_2d(np.zeros((10, 4)), "umap")
    with pytest.raises(ValueError, match="at least 3"):
        embed_2d(np.zeros((2, 4)))


@pytest.mark.parametrize("n_classes", [10, 26])
def test_plot_writes_a_png_sized_for_the_classes(tmp_path, n_classes):
    features = synthetic_cache(tmp_path / "f.h5", n_classes=n_classes, per_class=8)
    out = plot_embedding(features, tmp_path / "map.png", method="pca")
    with Image.open(out) as im:
        assert im.format == "PNG"
        width, height = im.size
    assert height >= (0.24 * n_classes + 1.5) * 110 - 2 and width > height  # the legend has room


def test_plot_samples_large_caches_and_draws_unlabelled_rows(tmp_path):
    path = synthetic_cache(tmp_path / "f.h5", n_classes=3, per_class=40)
    cache = read_cache(path)
    cache.labels[::4] = -1
    write_cache(cache, path)
    result = CliRunner().invoke(cli, ["plot", str(path), "-o", str(tmp_path / "m.png"), "--max-points", "50",
                                      "--method", "pca"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(tmp_path / "m.png") and (tmp_path / "m.png").stat().st_size > 10_000


def test_plot_errors_are_clear(tmp_path):
    tiny = synthetic_cache(tmp_path / "f.h5", n_classes=2, per_class=1)
    with pytest.raises(FeatcacheError, match="2 image"):
        plot_embedding(tiny, tmp_path / "m.png")
    with pytest.raises(FeatcacheError, match="choose one of tsne, pca"):
        plot_embedding(tiny, tmp_path / "m.png", method="lda")
    assert not (tmp_path / "m.png").exists()
    result = CliRunner().invoke(cli, ["plot", str(tmp_path / "none.h5")])
    assert result.exit_code != 0


def test_class_names_never_cover_each_other(tmp_path, monkeypatch):
    """Classes whose medians nearly coincide still get names that do not overlap."""
    from matplotlib.text import Text

    import featcache.report as report

    boxes = []
    real = report._name_clusters

    def record(ax, medians, fontsize):
        real(ax, medians, fontsize)
        renderer = ax.figure.canvas.get_renderer()
        for t in ax.texts:
            t.update_positions(renderer)
            boxes.append(Text.get_window_extent(t, renderer))  # the words, not the line

    monkeypatch.setattr(report, "_name_clusters", record)
    r = np.random.default_rng(0)
    points = np.concatenate([r.normal(0, 1, (20, 2)) + 0.01 * k for k in range(6)])  # six classes, one blob
    labels = np.repeat(np.arange(6), 20)
    report.save_embedding_png(points, labels, [f"class number {k}" for k in range(6)], tmp_path / "m.png")
    assert len(boxes) == 6
    assert not [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :] if a.overlaps(b)]


def test_plot_writes_beside_the_cache_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    features = synthetic_cache(tmp_path / "sub" / "f.h5")
    result = CliRunner().invoke(cli, ["plot", str(features), "--method", "pca"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "sub" / "embedding.png").is_file() and not (tmp_path / "embedding.png").exists()


def test_cjk_class_names_get_a_font_that_has_them_or_a_warning(tmp_path, monkeypatch):
    import featcache.report as report
    from featcache.errors import FeatcacheWarning
    from featcache.report import per_class_table, save_confusion_png

    names = ["塑料瓶 Plastic Bottle", "报纸 Newspaper"]
    matrix = np.array([[3, 1], [0, 4]])
    monkeypatch.setattr(report, "CJK_FONTS", ())  # none installed
    with pytest.warns(FeatcacheWarning, match="no font with CJK characters is installed .*empty boxes"):
        save_confusion_png(matrix, names, tmp_path / "none.png")
    assert report._font_rc(["Plastic Bottle"]) == {}  # Latin names need nothing
    monkeypatch.setattr(report, "CJK_FONTS", ("No Such Font", "DejaVu Sans"))  # the first one installed
    assert report._font_rc(names)["font.family"][-1] == "DejaVu Sans"
    save_confusion_png(matrix, names, tmp_path / "found.png")  # no warning: an error in the tests
    rows = [{"folder": f"0{i}", "name": n, "precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 3}
            for i, n in enumerate(names)]  # fmt: skip
    lines = per_class_table(rows).splitlines()
    assert len({report.display_width(line) for line in lines}) == 1  # the columns line up
