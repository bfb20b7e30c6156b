"""`fusemerge demo` runs offline and shows VaRM keeping each specialist's change where it was made."""

from __future__ import annotations

from fusemerge.demo.merge_only import run_demo


def test_demo(tmp_path):
    lines: list[str] = []
    results = run_demo(tmp_path / "demo", progress=False, echo=lines.append)
    varm, linear = results["variation_ratio"], results["linear"]
    assert varm["attention"][0] > 0.95 and varm["MLP"][1] > 0.95
    assert abs(linear["attention"][0] - 0.5) < 1e-3 and abs(linear["MLP"][1] - 0.5) < 1e-3
    assert any("VaRM" in line for line in lines)
    assert (tmp_path / "demo" / "merged-variation_ratio" / "model.safetensors.index.json").is_file()


def test_python_api_example_runs(tmp_path):
    import runpy
    import sys
    from pathlib import Path

    example = Path(__file__).parents[2] / "examples" / "merge_with_python_api.py"
    argv = sys.argv
    sys.argv = [str(example), str(tmp_path)]
    try:
        runpy.run_path(str(example), run_name="__main__")
    finally:
        sys.argv = argv
    assert (tmp_path / "merged" / "model.safetensors.index.json").is_file()


def test_cli_merge_only_demo_keeps_apart_from_the_fusion_demo(tmp_path):
    from click.testing import CliRunner

    from fusemerge.cli import main

    result = CliRunner().invoke(main, ["demo", "--merge-only", "-q", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "VaRM" in result.output
    assert (tmp_path / "merge-only" / "merged-linear" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "models").exists()  # the fusion demo's folders stay untouched
