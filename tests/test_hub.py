"""Publishing: model cards, and `merge --push-to-hub` / `push` end to end against a local fake Hub.

The CLI runs in a subprocess with HF_ENDPOINT pointing at `tests/fake_hub.py` and a recognisable fake
HF_TOKEN; afterwards the token must appear in the Authorization headers the server received and nowhere
else: not in any recorded request's path, other headers or body (create JSON, commit NDJSON and the files
it carries, LFS batch and uploads), not in stdout/stderr (with -v and huggingface_hub's debug logging on),
the card, or any file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fusemerge.card import EVAL_BEGIN, finetune_card, fused_card, merge_card, with_eval_section
from fusemerge.evaluate import EVAL_FILE, EvalReport, Score
from fusemerge.hub import check_complete
from fusemerge.offline.assets import build_random_model
from tests.fake_hub import running_fake_hub

TOKEN = "hf_FAKEtokenFusemergeTest0123456789abcdef"
ROOT = Path(__file__).resolve().parents[1]
RECIPE = "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n  - model: b\n    parameters: {weight: 2}\ndtype: float32\n"


def _report() -> EvalReport:
    scores = {
        ("openchat/openchat_3.5", "code"): Score(3, 300, 1000, 600.0),
        ("openchat/openchat_3.5", "chat"): Score(2, 100, 400, 250.0),
        ("merged", "code"): Score(3, 300, 1000, 500.0),
        ("merged", "chat"): Score(2, 100, 400, 240.0),
    }
    for m in ("openchat/openchat_3.5", "merged"):
        total = Score()
        total.add(scores[(m, "code")])
        total.add(scores[(m, "chat")])
        scores[(m, "all")] = total
    return EvalReport(["openchat/openchat_3.5", "merged"], ["chat", "code"], scores)


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_merge_card_front_matter_recipe_and_eval_table():
    recipe = "merge_method: variation_ratio\nbase_model: openchat/openchat_3.5\n# keep me\n"
    card = merge_card(
        method_name="variation_ratio",
        method_pretty="VaRM",
        method_url="https://arxiv.org/abs/2408.07990",
        base_model="openchat/openchat_3.5",
        models=["FuseAI/OpenChat-3.5-7B-Mixtral", "./local/fused"],
        recipe_text=recipe,
        evaluation=_report(),
    )
    front = _front_matter(card)
    assert front["base_model"] == ["openchat/openchat_3.5", "FuseAI/OpenChat-3.5-7B-Mixtral"]
    assert front["base_model_relation"] == "merge"
    assert front["library_name"] == "transformers"
    assert {"merge", "fusemerge", "variation_ratio"} <= set(front["tags"])
    assert "- `./local/fused`" in card  # a local input is named in the text, not in base_model
    assert "```yaml\n" + recipe.rstrip() + "\n```" in card
    # 2 bits/byte = 600 nats / ln 2 / 1000 bytes... per domain, and the 'all' row pools the sums
    assert "| code | 0.8656 (2.000) | 0.7213 (1.667) |" in card
    assert "| all |" in card and card.index("## Evaluation") < card.index("## Recipe")


def test_fused_card_names_pivot_as_base_and_sources_in_text():
    card = fused_card(
        pivot="openchat/openchat_3.5",
        sources=["NousResearch/Nous-Hermes-2-SOLAR-10.7B", "/data/local-source"],
        recipe_text="pivot: openchat/openchat_3.5\n",
    )
    front = _front_matter(card)
    assert front["base_model"] == "openchat/openchat_3.5"
    assert front["base_model_relation"] == "finetune"
    assert "fusemerge" in front["tags"] and "fusechat" in front["tags"]
    assert "- source: `NousResearch/Nous-Hermes-2-SOLAR-10.7B`" in card and "/data/local-source" in card
    assert "```yaml\npivot: openchat/openchat_3.5\n```" in card
    assert EVAL_BEGIN not in card
    with_table = with_eval_section(card, _report())
    assert with_table.count("## Evaluation") == 1 and with_table.index("## Evaluation") < with_table.index(
        "## Recipe"
    )
    assert with_eval_section(with_table, _report()) == with_table  # refreshing replaces, never duplicates


def test_finetune_card_is_a_plain_fine_tune_of_the_pivot_with_no_sources():
    card = finetune_card(pivot="openchat/openchat_3.5", recipe_text="fusion: {function: none}\n")
    front = _front_matter(card)
    assert front["base_model"] == "openchat/openchat_3.5" and front["base_model_relation"] == "finetune"
    assert "fine-tune" in front["tags"] and "fusechat" not in front["tags"]
    assert "# Fine-tuned model" in card and "no knowledge fusion" in card
    assert "source:" not in card and "towards the token distributions" not in card
    with_table = with_eval_section(card, _report())
    assert with_table.index("## Evaluation") < with_table.index("## Recipe")


def test_eval_report_json_round_trip():
    report = _report()
    again = EvalReport.from_json(report.to_json())
    assert again.to_dict()["results"] == report.to_dict()["results"]


def test_incomplete_merge_is_refused(tmp_path):
    from fusemerge.errors import FusemergeError

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FusemergeError, match="complete model folder"):
        check_complete(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / ".fusemerge").mkdir()
    (tmp_path / ".fusemerge" / "manifest.json").write_text('{"status": "running"}')
    with pytest.raises(FusemergeError, match="incomplete"):
        check_complete(tmp_path)
    (tmp_path / ".fusemerge" / "manifest.json").write_text('{"status": "complete"}')
    check_complete(tmp_path)


def test_hub_errors_become_one_line_without_the_token():
    from huggingface_hub.errors import HfHubHTTPError

    try:  # huggingface_hub 2.x ships its own fork of httpx; 1.x uses httpx
        import httpx2 as httpx
    except ImportError:
        import httpx

    from fusemerge.errors import FusemergeError
    from fusemerge.hub import _user_error

    response = httpx.Response(401, request=httpx.Request("POST", "http://hub/api/repos/create"))
    err = _user_error(
        HfHubHTTPError(f"401 Unauthorized\nbad token {TOKEN}", response=response), "me/x", TOKEN
    )
    assert isinstance(err, FusemergeError)
    assert TOKEN not in str(err) and "\n" not in str(err) and "hf auth login" in str(err)


def _cli(args: list[str], env_extra: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(env_extra, PYTHONPATH=str(ROOT), HF_TOKEN=TOKEN, HF_HUB_DISABLE_XET="1")
    env.update(HF_HOME=str(cwd / "hf_home"), HF_HUB_VERBOSITY="debug", HF_HUB_DISABLE_TELEMETRY="1")
    return subprocess.run(
        [sys.executable, "-m", "fusemerge.cli", "-v", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_merge_push_to_hub_then_push_to_a_branch(tmp_path):
    build_random_model(tmp_path / "a", vocab_size=256, hidden_size=32, intermediate_size=64, seed=1)
    build_random_model(tmp_path / "b", vocab_size=256, hidden_size=32, intermediate_size=64, seed=2)
    (tmp_path / "recipe.yml").write_text(RECIPE)
    with running_fake_hub() as hub:
        env = {"HF_ENDPOINT": hub.url}
        run = _cli(["merge", "recipe.yml", "out", "-q", "--push-to-hub", "me/tiny-merge"], env, tmp_path)
        assert run.returncode == 0, run.stderr[-2000:]
        out = tmp_path / "out"
        assert (out / ".fusemerge" / "manifest.json").is_file()
        uploaded = hub.files("me/tiny-merge")
        local = {
            p.relative_to(out).as_posix(): p.read_bytes()
            for p in out.rglob("*")
            if p.is_file() and ".fusemerge" not in p.parts
        }
        assert uploaded == local and "model.safetensors.index.json" in uploaded
        assert not any(".fusemerge" in name for name in uploaded)
        assert hub.lfs, "the safetensors shards went through the LFS upload"
        assert hub.paths()[0] == "POST /api/repos/create"
        assert "POST /api/models/me/tiny-merge/commit/main" in hub.paths()
        assert json.loads(hub.requests[0].body)["visibility"] == "public"
        assert hub.repos["me/tiny-merge"]["private"] is False

        # The same folder again, to a new branch, private, with an eval table: the card gets it.
        (out / EVAL_FILE).write_text(_report().to_json())
        run2 = _cli(
            ["push", "out", "me/tiny-merge", "--private", "--revision", "dev", "--commit-message", "eval"],
            env,
            tmp_path,
        )
        assert run2.returncode == 0, run2.stderr[-2000:]
        commit = [r for r in hub.requests if r.path.startswith("/api/models/me/tiny-merge/commit/dev")]
        assert len(commit) == 1 and json.loads(commit[0].body.splitlines()[0])["value"]["summary"] == "eval"
        assert "POST /api/models/me/tiny-merge/branch/dev" in hub.paths()
        dev = hub.files("me/tiny-merge", "dev")
        assert "## Evaluation" in dev["README.md"].decode() and EVAL_FILE in dev
        assert "## Evaluation" not in uploaded["README.md"].decode()  # main keeps the first push

        auth = {
            r.headers.get("authorization")
            for r in hub.requests
            if r.method == "POST" and r.path.startswith("/api/")
        }
        assert auth == {f"Bearer {TOKEN}"}, "the token from HF_TOKEN reached the Hub"
        assert hub.token_leaks(TOKEN) == []  # every request: path, other headers, bodies, file contents
        assert any(r.method == "PUT" and r.path.startswith("/lfs-upload/") for r in hub.requests)
        assert any(r.path.endswith("/info/lfs/objects/batch") for r in hub.requests)
    for result in (run, run2):
        assert TOKEN not in result.stdout and TOKEN not in result.stderr
        assert TOKEN[3:20] not in result.stderr  # not even a fragment
    assert _files_containing(tmp_path, TOKEN.encode()) == []
    assert all(TOKEN.encode() not in data for data in hub.files("me/tiny-merge", "dev").values())


def test_push_refuses_unfinished_merge_with_one_line(tmp_path):
    folder = tmp_path / "half"
    folder.mkdir()
    (folder / ".model-00001-of-00002.safetensors.partial").write_bytes(b"x")
    with running_fake_hub() as hub:
        run = _cli(["push", "half", "me/x"], {"HF_ENDPOINT": hub.url}, tmp_path)
        assert hub.requests == []
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "not a complete model folder" in run.stderr


def test_a_token_typed_as_the_repo_id_is_refused_and_never_printed(tmp_path):
    build_random_model(tmp_path / "m", vocab_size=256, hidden_size=32, intermediate_size=64, seed=1)
    typed = "hf_TypedWhereTheRepoGoes0123456789abcd"
    with running_fake_hub() as hub:
        run = _cli(["push", "m", typed], {"HF_ENDPOINT": hub.url}, tmp_path)
        assert hub.requests == [], "nothing is sent"
    assert run.returncode == 2 and "looks like a Hub access token" in run.stderr, run.stderr
    assert typed not in run.stderr + run.stdout and TOKEN not in run.stderr + run.stdout


def test_token_shaped_text_is_scrubbed_from_our_messages():
    from fusemerge.hub import _user_error

    typed = "me/hf_TypedWhereTheRepoGoes0123456789abcd"
    err = _user_error(OSError(f"cannot reach {typed}"), typed, None)
    assert "hf_Typed" not in str(err) and "***" in str(err)


def test_merge_push_to_hub_with_a_token_is_refused_before_merging(tmp_path):
    from click.testing import CliRunner

    from fusemerge.cli import main

    recipe = tmp_path / "r.yml"
    recipe.write_text("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n")
    result = CliRunner().invoke(
        main, ["merge", str(recipe), str(tmp_path / "out"), "--push-to-hub", "hf_" + "x" * 34]
    )
    assert result.exit_code == 2 and "looks like a Hub access token" in result.stderr, result.output
    assert "x" * 34 not in result.stderr and not (tmp_path / "out").exists()
