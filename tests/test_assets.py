"""Shipped assets: path() finds verified folders; missing / corrupt / unknown ones fail in one line naming
the rebuild command; the build runs several pretrain configs in sequence; the size budget holds."""

import json
import os

import pytest

from stepdistill import assets
from stepdistill.assets import build as asset_build
from stepdistill.assets.registry import ASSETS, AssetSpec
from stepdistill.cli import main
from stepdistill.errors import UsageError


def make_asset(root, name="tiny", files=None):
    folder = root / name
    for rel, data in (files or {"a.bin": b"\x00" * 64, "sub/config.json": b"{}"}).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    assets.write_manifest(folder, {"name": name, "metrics": {}})
    return folder


def one_line_error(fn, *args, **kw) -> str:
    with pytest.raises(UsageError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_path_returns_a_verified_folder(tmp_path):
    folder = make_asset(tmp_path)
    assert assets.path("tiny", tmp_path) == folder
    manifest = assets.read_manifest(folder)
    assert manifest["files"]["a.bin"]["bytes"] == 64 and manifest["total_bytes"] == 66
    assert assets.path("tiny", tmp_path) == folder  # cached verification


def test_missing_and_unknown_assets(tmp_path):
    msg = one_line_error(assets.path, "digits-teacher", tmp_path)
    assert "digits-teacher" in msg and "missing" in msg and "stepdistill assets build digits-teacher" in msg
    msg = one_line_error(assets.path, "no-such-asset", tmp_path)
    assert "unknown asset 'no-such-asset'" in msg and "digits-teacher" in msg


@pytest.mark.parametrize("damage, expect", [
    ("truncate", "bytes"), ("flip", "sha256"), ("delete", "missing"), ("manifest", "asset.json")])
def test_corrupt_asset_is_detected(tmp_path, damage, expect):
    folder = make_asset(tmp_path)
    assets.path("tiny", tmp_path)  # verified (and cached) before the damage
    f = folder / "a.bin"
    if damage == "truncate":
        f.write_bytes(b"\x00" * 10)
    elif damage == "flip":
        f.write_bytes(b"\x01" + b"\x00" * 63)
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    elif damage == "delete":
        f.unlink()
    else:
        (folder / "asset.json").write_text("{not json")
    msg = one_line_error(assets.path, "tiny", tmp_path)
    assert "asset 'tiny' is corrupt" in msg and expect in msg and "stepdistill assets build tiny" in msg


def test_model_source_resolves_assets():
    from stepdistill.models import resolve_source

    with pytest.raises(UsageError, match="unknown asset"):
        resolve_source("asset:no-such-asset")


def test_cli_list_and_unknown_build(tmp_path, capsys):
    make_asset(tmp_path)
    assert main(["assets", "list", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "digits-teacher" in out and "missing" in out and "of 25.0 MB" in out
    assert main(["assets", "build", "no-such-asset"]) == 2


def _two_stage(b):
    """A recipe that chains two pretrain runs (the second could read the first's export) into subfolders."""
    first = b.install(b.pretrain("configs/toy2d/mlp.yaml", tag="first"), "first")
    b.install(b.pretrain("configs/toy2d/mlp.yaml", ["model.arch.hidden=16"], tag="second"), "second")
    return {"first_files": sorted(p.name for p in first.iterdir())}


def test_build_runs_configs_in_sequence(tmp_path, monkeypatch):
    spec = AssetSpec("two-stage", "test", ("configs/toy2d/mlp.yaml",) * 2, _two_stage)
    monkeypatch.setitem(ASSETS, "two-stage", spec)
    root = tmp_path / "assets"
    manifest = asset_build.build("two-stage", root, tmp_path / "runs", ["train.steps=3", "train.batch_size=8"],
                                 quiet=True)
    folder = assets.path("two-stage", root)
    assert sorted(manifest["files"]) == ["first/config.json", "first/model.safetensors", "first/sampling.json",
                                         "second/config.json", "second/model.safetensors", "second/sampling.json"]
    assert json.loads((folder / "second" / "config.json").read_text())["hidden"] == 16
    runs = manifest["runs"]
    assert [r["steps"] for r in runs] == [3, 3] and runs[1]["overrides"][0] == "model.arch.hidden=16"
    assert manifest["metrics"]["first_files"] == ["config.json", "model.safetensors", "sampling.json"]
    assert manifest["rebuild"] == "stepdistill assets build two-stage" and manifest["train_minutes"] >= 0
    assert not any(p.name.startswith(".") for p in root.iterdir())  # no staging leftovers


def test_build_refuses_to_exceed_the_budget(tmp_path, monkeypatch):
    spec = AssetSpec("big", "test", (), lambda b: (b.out / "w.bin").write_bytes(b"\x00" * 2048) and {})
    monkeypatch.setitem(ASSETS, "big", spec)
    monkeypatch.setattr(asset_build, "BUDGET_BYTES", 1000)
    with pytest.raises(UsageError, match="over the"):
        asset_build.build("big", tmp_path, tmp_path / "runs")
    assert not any(tmp_path.glob("big")) and not any(tmp_path.glob(".big*"))


def test_requirements_must_exist(tmp_path):
    msg = one_line_error(asset_build.build, "digits-teacher", tmp_path, tmp_path / "runs")
    assert "digits-classifier" in msg and "stepdistill assets build digits-classifier" in msg


def test_shipped_assets_verify_and_fit_the_budget():
    total = 0
    for name in ASSETS:
        folder = assets.path(name)
        manifest = assets.read_manifest(folder)
        assert manifest["metrics"] and manifest["runs"], name
        total += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert total < assets.BUDGET_BYTES
