"""`fusemerge demo` runs offline and shows VaRM keeping each specialist's change where it was made."""

from __future__ import annotations

from fusemerge.demo import run_demo


def test_demo(tmp_path):
    lines: list[str] = []
    results = run_demo(tmp_path / "demo", progress=False, echo=lines.append)
    varm, linear = results["variation_ratio"], results["linear"]
    assert varm["attention"][0] > 0.95 and varm["MLP"][1] > 0.95
    assert abs(linear["attention"][0] - 0.5) < 1e-3 and abs(linear["MLP"][1] - 0.5) < 1e-3
    assert any("VaRM" in line for line in lines)
    assert (tmp_path / "demo" / "merged-variation_ratio" / "model.safetensors.index.json").is_file()
