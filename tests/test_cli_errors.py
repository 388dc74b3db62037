"""What the command line says when something is wrong: one `error:` line and exit 1, before long work."""

import os

import pytest
from conftest import make_dataset, synthetic_cache
from support import can_honour_permissions, run_featcache

from featcache.cli import as_flags, main
from featcache.errors import Interrupted
from featcache.extract import extract


def _one_error_line(run, *fragments, status=1):
    assert run.returncode == status, (run.returncode, run.stderr)
    assert "Traceback" not in run.stderr, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def test_unwritable_fit_output_fails_before_cross_validation(tmp_path):
    cache = synthetic_cache(tmp_path / "f.h5")
    run = run_featcache(["fit", cache, "-o", "/proc/forbidden"], timeout=120)
    _one_error_line(run, "/proc/forbidden: cannot write there")
    assert "settings x" not in run.stderr  # no family was cross-validated


def test_a_file_used_as_a_folder_is_named(tmp_path):
    cache = synthetic_cache(tmp_path / "f.h5")
    (tmp_path / "afile").write_text("x")
    run = run_featcache(["plot", cache, "-o", tmp_path / "afile" / "x.png"], timeout=120)
    _one_error_line(run, "afile: cannot write there (a file is in the way)")
    run = run_featcache(["fit", cache, "-o", tmp_path / "afile" / "models"], timeout=120)
    _one_error_line(run, "afile")


@pytest.mark.skipif(not can_honour_permissions(), reason="cannot make a child respect permissions")
def test_a_read_only_folder_is_refused_up_front(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=2)
    cache = synthetic_cache(tmp_path / "f.h5")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for args in (
            ["extract", data, "-o", ro / "features.h5", "--backbone", "efficientnet_lite0"],
            ["fit", cache, "-o", ro / "models"],
            ["plot", cache, "-o", ro / "map.png"],
            ["demo", "--workdir", ro / "demo"],
        ):
            run = run_featcache(args, honour_permissions=True, timeout=120)
            _one_error_line(run, str(ro), "Permission denied")
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["extract", "missing_dir"], "missing_dir: no such folder"),
        (["extract", "a_file.png"], "a_file.png: not a folder"),
        (["info", "missing.h5"], "missing.h5: no such feature cache"),
        (["info", "."], ".: a folder, not a featcache feature cache"),
        (["fit", "missing.h5"], "missing.h5: no such feature cache"),
        (["evaluate", "missing_dir"], "missing_dir: no such feature cache or image folder"),
        (["plot", "missing.h5"], "missing.h5: no such feature cache"),
        (["predict", "x.png", "--model-path", "missing"], "missing: no such model"),
        (["export", "--model-path", "missing"], "missing: no such model"),
        (["serve", "--model-path", "missing"], "missing: no such model"),
        (["choose", "missing_dir"], "missing_dir: no such folder"),
        (
            ["choose", ".", "--only", "--candidate", "efficientnet_lite0@finetune:8"],
            "maps: 8 is not a stage of efficientnet_lite0",
        ),
    ],
)
def test_a_missing_input_is_one_error_line_for_every_command(tmp_path, args, fragment):
    (tmp_path / "a_file.png").write_bytes(b"")
    run = run_featcache(args, timeout=120, cwd=tmp_path)
    _one_error_line(run, fragment)


def test_a_mistyped_backbone_is_a_usage_error_told_before_torch_loads(tmp_path):
    import subprocess
    import sys

    data = make_dataset(tmp_path / "data", per_class=2)
    run = run_featcache(["extract", data, "--backbone", "efficientnet_lite00"], timeout=120, cwd=tmp_path)
    typo = "unknown backbone 'efficientnet_lite00'; did you mean 'efficientnet_lite0'?"
    _one_error_line(run, typo, status=2)
    assert not (tmp_path / "features.h5").exists()
    code = (
        "import sys\nfrom featcache.cli import main\n"
        "try:\n    main(['extract', sys.argv[1], '--backbone', 'efficientnet_lite00'])\n"
        "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, data], capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.split() == ["2", "False"], out.stderr
    run = run_featcache(["choose", ".", "--only", "--candidate", "no_such_net"], timeout=120, cwd=tmp_path)
    _one_error_line(run, "unknown backbone 'no_such_net'", status=2)


def test_a_flat_folder_is_told_that_classes_are_sub_folders_and_cv_is_a_flag(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=3)
    flat = tmp_path / "flat"
    flat.mkdir()
    for image in sorted(data.rglob("*.jpg")):
        (flat / f"{image.parent.name}-{image.name}").write_bytes(image.read_bytes())
    for folder in (flat, data):
        extract(folder, tmp_path / f"{folder.name}.h5", backbone="efficientnet_lite0", engine="torch")
    run = run_featcache(["fit", tmp_path / "flat.h5", "-o", tmp_path / "m"], timeout=120)
    _one_error_line(run, "found 0: classes are sub-folders (DATA_DIR/<class>/<image>)")
    run = run_featcache(["fit", tmp_path / "data.h5", "-o", tmp_path / "m"], timeout=120)
    _one_error_line(run, "fewer images than the 5 folds:", "use fewer folds than --cv 5")


def test_a_near_miss_never_hides_a_torchvision_model():
    import torchvision

    from featcache.backbones.registry import get_entry

    assert get_entry("efficientnet_b0").name == "efficientnet_b0"  # 0.85 like efficientnet_lite0: no typo
    names = torchvision.models.list_models(module=torchvision.models)
    import difflib

    from featcache.backbones.registry import list_backbones

    assert not [n for n in names if n not in list_backbones()
                and difflib.get_close_matches(n, list_backbones(), n=1, cutoff=0.9)]  # fmt: skip


def test_fine_tuning_a_cache_without_maps_is_one_error_line(tmp_path):
    cache = synthetic_cache(tmp_path / "f.h5")
    run = run_featcache(["fit", cache, "--model", "finetune", "-o", tmp_path / "m"], timeout=120)
    _one_error_line(run, "keeps no feature maps to fine-tune on: extract with --maps STAGE")
    data = make_dataset(tmp_path / "data", per_class=2)
    run = run_featcache(["extract", data, "--backbone", "efficientnet_lite0", "--maps", "7"], timeout=120,
                        cwd=tmp_path)  # fmt: skip
    _one_error_line(run, "maps: 7 is not a stage of efficientnet_lite0; use a stage index 0-6")
    assert not (tmp_path / "m").exists() and not (tmp_path / "features.h5").exists()


def test_debug_works_before_and_after_the_command(tmp_path):
    for args in (["--debug", "info", "missing.h5"], ["info", "missing.h5", "--debug"]):
        run = run_featcache(args, timeout=120, cwd=tmp_path)
        assert run.returncode == 1 and "Traceback" in run.stderr and "error: missing.h5" in run.stderr


def test_library_parameters_become_flags():
    message = (
        "x.h5 holds features made differently: pass overwrite=True to replace it, or output=OTHER.h5 to "
        "write another file; or pass weights=PATH, or use backbone='efficientnet_lite0'"
    )
    assert as_flags(message) == (
        "x.h5 holds features made differently: pass --overwrite to replace it, or -o OTHER.h5 to "
        "write another file; or pass --weights PATH, or use --backbone efficientnet_lite0"
    )
    assert (
        as_flags("no model_path here, overwrite is not a flag")
        == "no model_path here, overwrite is not a flag"
    )


def test_an_os_error_is_one_line(tmp_path, monkeypatch, capsys):
    import featcache.cache

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(featcache.cache, "read_cache", denied)
    with pytest.raises(SystemExit) as e:
        main(["info", "x.h5"])
    assert e.value.code == 1 and capsys.readouterr().err == "error: x.h5: Permission denied\n"


def test_ctrl_c_says_what_was_kept(monkeypatch, capsys, tmp_path):
    import featcache.extract

    def interrupted(*args, **kwargs):
        raise Interrupted("8 of 18 images done are kept; run the same extract again to resume")

    monkeypatch.setattr(featcache.extract, "extract", interrupted)
    with pytest.raises(SystemExit) as e:
        main(["extract", str(tmp_path), "-q"])
    err = capsys.readouterr().err
    assert e.value.code == 130
    assert err.strip() == "interrupted: 8 of 18 images done are kept; run the same extract again to resume"
