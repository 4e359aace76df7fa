import sys

from icv_vllm.plugin.import_hooks import when_imported


def test_callback_runs_when_module_is_first_imported(tmp_path, monkeypatch):
    (tmp_path / "icv_hook_probe.py").write_text("VALUE = 41\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    when_imported("icv_hook_probe", lambda m: seen.append(m.VALUE + 1))
    assert seen == []
    import icv_hook_probe  # noqa: F401

    assert seen == [42]
    del sys.modules["icv_hook_probe"]


def test_callback_runs_at_once_for_an_imported_module():
    seen = []
    when_imported("json", lambda m: seen.append(m.__name__))
    assert seen == ["json"]
