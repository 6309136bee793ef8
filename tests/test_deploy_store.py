"""The model store (versions, atomic current/previous pointers) and the quality gate: unit tests
on hand-made folders and figures (no models, no network)."""

import json
import os
import threading

import pytest

from deploy import redeploy, store
from deploy.store import StoreError


def figures(overall=57.0, fid=20.0, n=200, rows=("Imagine Flash, 3-step",)):
    metrics = {
        "alignment": {"color": 96.0, "shape": 91.0, "size": 88.0, "spatial": 39.0, "overall": overall},
        "fid": fid,
        "vividness": 0.6,
        "background": 0.9,
        "n": n,
    }
    return {"n": n, "rows": {row: json.loads(json.dumps(metrics)) for row in rows}}


def fake_family(path, version="0", figs=None):
    """The files the store looks at: model_index.json, flash.json with eval, a student card."""
    (path / "students" / "3-step").mkdir(parents=True)
    (path / "model_index.json").write_text("{}")
    card = {"format": "imagine-flash/family", "name": "tiny", "version": version}
    if figs is not False:
        card["eval"] = figs or figures()
    (path / "flash.json").write_text(json.dumps(card))
    (path / "students" / "3-step" / "flash.json").write_text(json.dumps({"steps": 3, "version": version}))
    return path


@pytest.fixture
def s(tmp_path):
    return tmp_path / "store"


def test_publish_stamps_the_family_card_and_versions_are_immutable(s, tmp_path):
    src = fake_family(tmp_path / "fam")
    dest = store.publish(s, "tiny", src, "v1")
    assert dest == s / "tiny" / "v1"
    assert json.loads((dest / "flash.json").read_text())["version"] == "v1"
    assert json.loads((dest / "students/3-step/flash.json").read_text())["version"] == "0"  # left alone
    assert json.loads((dest / "flash.json").read_text())["eval"]["rows"]  # the figures travel along
    assert src.is_dir()  # copied, not moved
    with pytest.raises(StoreError, match="already exists"):
        store.publish(s, "tiny", src, "v1")
    assert store.versions(s, "tiny") == ["v1"]
    assert not [p for p in (s / "tiny").iterdir() if p.name.startswith(".")]  # no leftovers


def test_publish_refuses_folders_without_figures_and_bad_names(s, tmp_path):
    with pytest.raises(StoreError, match="no evaluation figures"):
        store.publish(s, "tiny", fake_family(tmp_path / "a", figs=False), "v1")
    with pytest.raises(StoreError, match="no flash.json"):
        store.publish(s, "tiny", tmp_path, "v1")
    for bad in ("current", "previous", ".hidden", "a/b", ""):
        with pytest.raises(StoreError, match="invalid version name"):
            store.check_version_name(bad)
    assert store.versions(s, "tiny") == []


def test_pointers_are_relative_symlinks_swapped_atomically(s, tmp_path):
    for v in ("v1", "v2", "v3"):
        store.publish(s, "tiny", fake_family(tmp_path / v), v)
    assert store.current(s, "tiny") is None and store.previous(s, "tiny") is None
    assert store.set_current(s, "tiny", "v1") is None
    assert store.set_current(s, "tiny", "v2") == "v1"
    assert (store.current(s, "tiny"), store.previous(s, "tiny")) == ("v2", "v1")
    link = s / "tiny" / "current"
    assert link.is_symlink() and os.readlink(link) == "v2"  # relative: the store can be mounted anywhere
    assert json.loads((link / "flash.json").read_text())["version"] == "v2"
    store.set_current(s, "tiny", "v2")  # the same version again leaves `previous` alone
    assert store.previous(s, "tiny") == "v1"
    with pytest.raises(StoreError, match="no version 'v9'.*v1, v2, v3"):
        store.set_current(s, "tiny", "v9")
    store.restore(s, "tiny", "v3", "v2")
    assert (store.current(s, "tiny"), store.previous(s, "tiny")) == ("v3", "v2")


def test_readers_never_see_a_missing_pointer_while_it_swaps(s, tmp_path):
    for v in ("v1", "v2"):
        store.publish(s, "tiny", fake_family(tmp_path / v), v)
    store.set_current(s, "tiny", "v1")
    card = s / "tiny" / "current" / "flash.json"
    seen, stop = set(), threading.Event()

    def read():
        while not stop.is_set():
            seen.add(json.loads(card.read_text())["version"])  # raises if the link were ever absent

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(200):
            store.set_current(s, "tiny", "v2" if i % 2 == 0 else "v1")
    finally:
        stop.set()
        reader.join(5)
    assert seen <= {"v1", "v2"} and "v1" in seen


def test_a_real_folder_named_current_is_not_overwritten(s, tmp_path):
    store.publish(s, "tiny", fake_family(tmp_path / "v1"), "v1")
    (s / "tiny" / "current").mkdir()
    with pytest.raises(StoreError, match="not a symlink"):
        store.set_current(s, "tiny", "v1")


def test_gate_passes_equal_figures_and_names_the_figure_that_dropped():
    cur = figures(overall=57.0, fid=20.0)
    margin = {"alignment.overall": 2.0, "fid": "10%"}
    assert store.gate(figures(overall=57.0, fid=20.0), cur, margin) == (True, [])
    assert store.gate(figures(overall=55.5, fid=21.9), cur, margin)[0]  # within both margins
    ok, reasons = store.gate(figures(overall=40.0, fid=20.0), cur, margin)
    assert not ok and len(reasons) == 1
    assert "Imagine Flash, 3-step: alignment.overall fell from 57 to 40" in reasons[0]
    ok, reasons = store.gate(figures(overall=57.0, fid=30.0), cur, margin)  # fid: lower is better
    assert not ok and "fid fell from 20 to 30" in reasons[0] and "allowed 2" in reasons[0]
    assert store.gate(figures(overall=99.0, fid=1.0), cur, margin)[0]  # better is always fine


def test_gate_refuses_missing_rows_other_sizes_and_no_figures():
    cur = figures(rows=("Imagine Flash, 3-step", "Imagine Flash, 1-step"))
    ok, reasons = store.gate(figures(), cur, 1.0)
    assert not ok and reasons == ["Imagine Flash, 1-step: missing from the candidate"]
    ok, reasons = store.gate(figures(n=50), figures(n=200), 1.0)
    assert not ok and "n=50" in reasons[0]
    assert not store.gate({}, cur, 1.0)[0]
    ok, reasons = store.gate(figures(), None, 1.0)
    assert ok and "nothing to compare" in reasons[0]


def test_single_margin_applies_to_every_figure_and_bad_margins_are_named(tmp_path):
    ok, reasons = store.gate(figures(overall=56.0), figures(overall=57.0), 0.5)
    assert not ok and "alignment.overall" in reasons[0]
    with pytest.raises(ValueError, match="'lots'"):
        store.allowed_drop({"fid": "lots"}, "fid", 1.0)
    f = tmp_path / "gate.json"
    f.write_text(json.dumps({"margin": {"fid": -1}}))
    with pytest.raises(ValueError, match="-1"):
        store.load_margin(f)
    assert store.load_margin(store.Path(__file__).parents[1] / "deploy" / "gate.json")["fid"] == "10%"


def test_figures_from_evaluator_json():
    results = [{"row": {"name": "teacher"}, "metrics": {"fid": 1.0, "n": 8}}]
    assert store.figures_from_results(results) == {"n": 8, "rows": {"teacher": {"fid": 1.0, "n": 8}}}


def test_store_cli(s, tmp_path, capsys):
    src = fake_family(tmp_path / "fam")
    assert store.main(["--store", str(s), "--family", "tiny", "publish", str(src), "--version", "v1"]) == 0
    assert store.main(["--store", str(s), "--family", "tiny", "current"]) == 1
    assert store.main(["--store", str(s), "--family", "tiny", "set-current", "v1"]) == 0
    assert store.main(["--store", str(s), "--family", "tiny", "list"]) == 0
    out = capsys.readouterr().out
    assert "current  v1  n=200 overall: 3-step 57.0%" in out
    assert store.main(["--store", str(s), "--family", "tiny", "set-current", "nope"]) == 1
    assert "no version 'nope'" in capsys.readouterr().err


def test_redeploy_refuses_without_replicas_token_or_previous(s, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FLASH_ADMIN_TOKEN", raising=False)
    store.publish(s, "tiny", fake_family(tmp_path / "fam"), "v1")
    base = ["--store", str(s), "--family", "tiny"]
    assert redeploy.main([*base, "v1"]) == 1
    assert "no admin token" in capsys.readouterr().err
    monkeypatch.setenv("FLASH_ADMIN_TOKEN", "t")
    assert redeploy.main([*base, "v1", "--replicas", ""]) == 1
    assert "no replicas" in capsys.readouterr().err
    assert redeploy.main([*base, "--rollback", "--replicas", "http://127.0.0.1:9"]) == 1
    assert "nothing to roll back to" in capsys.readouterr().err
    # a replica that does not answer: refused before anything changes
    assert redeploy.main([*base, "v1", "--replicas", "http://127.0.0.1:9", "--timeout", "2"]) == 1
    assert "nothing was changed" in capsys.readouterr().err and store.current(s, "tiny") is None
    assert redeploy.resolve_replicas("http://a:1/, http://b:2", "localhost:8000")[:2] == [
        "http://a:1",
        "http://b:2",
    ]
