"""The README's example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has a python example"
    namespace: dict[str, object] = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    assert len(namespace["sites"]) == 8
    assert namespace["site"].outbound_size == 5760
    assert namespace["closed"].conv.out_channels == 8
    assert namespace["wider"].conv.out_channels == 9


def test_readme_statistics_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2, "README.md has a statistics example"
    namespace: dict[str, object] = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    exec(compile(blocks[1], str(README), "exec"), namespace)
    assert len(namespace["stats"]) == 8
    assert namespace["opened"].conv.out_channels == 9
    assert namespace["new_model"].conv.out_channels == 10
    assert [t.clone for t in namespace["tunnels"]] == [8, 9]


def test_readme_reducibility_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    namespace: dict[str, object] = {}
    for block in blocks[:3]:
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["report"].measures and namespace["reduction"].applied == ()
    assert namespace["smaller"].conv.out_channels == 8


def test_readme_onnx_example_runs(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import warnings

    warnings.simplefilter("ignore")
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    namespace: dict[str, object] = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    exec(compile(blocks[3], str(README), "exec"), namespace)
    assert (tmp_path / "cnn.onnx").is_file()
    assert [s.name for s in namespace["sites"]][:2] == ["conv[0]", "conv[1]"]
    assert namespace["converted"].conv.out_channels == 9


def test_readme_training_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    namespace: dict[str, object] = {}
    exec(compile(blocks[4], str(README), "exec"), namespace)
    events = namespace["controller"].events  # type: ignore[attr-defined]
    assert [(e.step, e.action) for e in events] == [(4, "open"), (7, "close")]
    assert namespace["model"].conv.out_channels == 8  # type: ignore[attr-defined]
