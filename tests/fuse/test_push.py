"""`fusemerge fuse --push-to-hub`: where each target goes, misuse refused up front, and a tiny fusion pushed
end to end to the local fake Hub (tests/fake_hub.py), the token in the Authorization header and nowhere else.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from fusemerge.checkpoint.layout import RECIPE_NAME, TARGET_STAMP
from fusemerge.errors import FusemergeError
from fusemerge.fuse.cli import fuse
from fusemerge.fuse.pipeline import hub_repo_ids
from fusemerge.fuse.recipe import FuseRecipe
from tests.fake_hub import running_fake_hub
from tests.test_hub import TOKEN, _cli, _files_containing, _front_matter


def _recipe(models: list[str], **fusion) -> FuseRecipe:
    return FuseRecipe.model_validate(
        {
            "pivot": "openchat/openchat_3.5",
            "sources": models,
            "dataset": {"path": "chat.jsonl"},
            "fusion": fusion,
            "output": "fused",
        }
    )


TWO = ["NousResearch/Nous-Hermes-2-SOLAR-10.7B", "NousResearch/Nous-Hermes-2-Mixtral-8x7B-DPO"]


def test_repo_ids_one_target_as_given_several_suffixed_namespace_by_folder():
    out = Path("fused")
    assert hub_repo_ids(_recipe(TWO[:1]), "me/OC-7B") == {
        out / "openchat_3.5-Nous-Hermes-2-SOLAR-10.7B": "me/OC-7B"
    }
    assert hub_repo_ids(_recipe(TWO, sources="all"), "OC-7B") == {out / "openchat_3.5-fused": "OC-7B"}
    assert hub_repo_ids(_recipe(TWO), "me/OC-7B") == {
        out / "openchat_3.5-Nous-Hermes-2-SOLAR-10.7B": "me/OC-7B-Nous-Hermes-2-SOLAR-10.7B",
        out / "openchat_3.5-Nous-Hermes-2-Mixtral-8x7B-DPO": "me/OC-7B-Nous-Hermes-2-Mixtral-8x7B-DPO",
    }
    assert hub_repo_ids(_recipe(TWO), "me/") == {
        out / "openchat_3.5-Nous-Hermes-2-SOLAR-10.7B": "me/openchat_3.5-Nous-Hermes-2-SOLAR-10.7B",
        out / "openchat_3.5-Nous-Hermes-2-Mixtral-8x7B-DPO": "me/openchat_3.5-Nous-Hermes-2-Mixtral-8x7B-DPO",
    }


@pytest.mark.parametrize(
    ("sources", "repo_id", "message"),
    [
        (TWO[:1], "me/a--b", "'me/a--b' is not a valid Hub repo id: Cannot have -- or .."),
        (TWO[:1], "me/x/y", "'me/x/y' is not a valid Hub repo id: Repo id must be in the form"),
        (
            TWO,
            "me/" + "x" * 75,
            "(for the target openchat_3.5-Nous-Hermes-2-SOLAR-10.7B) is not a valid Hub repo id",
        ),
    ],
)
def test_bad_repo_ids_are_one_line_errors(sources, repo_id, message):
    with pytest.raises(FusemergeError) as info:
        hub_repo_ids(_recipe(sources), repo_id)
    assert message in str(info.value) and info.value.key == "--push-to-hub"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--private"], "key '--private': --private only applies with --push-to-hub"),
        (["--steps", "teach,align", "--push-to-hub", "me/x"], "key '--push-to-hub': the trained targets"),
        (["--push-to-hub", "me/x..y"], "key '--push-to-hub': 'me/x..y' is not a valid Hub repo id"),
    ],
)
def test_fuse_push_misuse_exits_2_before_any_work(tmp_path, args, message):
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        f"pivot: {tmp_path / 'missing-pivot'}\nsources: [org/src]\ndataset: {{path: chat.jsonl}}\n"
        f"output: {tmp_path / 'fused'}\n"
    )
    result = CliRunner().invoke(fuse, [str(recipe), *args])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("fusemerge: error: ") and message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "fused").exists()


def test_fuse_push_to_hub_uploads_the_trained_target_with_its_card(tmp_path, tiny_models, chat_jsonl):
    recipe_text = (
        f"pivot: {tiny_models['gpt2']}\n"
        f"sources: [{tiny_models['mistral']}]\n"
        f"dataset: {{path: {chat_jsonl}, limit: 4, max_length: 256}}\n"
        "chat_template: chatml\n"
        "teacher: {top_k: 4, device: cpu, shard_size: 8}\n"
        "fusion: {lambda: 0.5}\n"
        "training: {mode: full, learning_rate: 1.0e-3, batch_size: 2, gradient_accumulation: 1, "
        "max_steps: 1, save_steps: 1}\n"
        "output: fused\n"
    )
    (tmp_path / "recipe.yml").write_text(recipe_text)
    with running_fake_hub() as hub:
        run = _cli(
            ["fuse", "recipe.yml", "-q", "--push-to-hub", "me/tiny-fused", "--private"],
            {"HF_ENDPOINT": hub.url},
            tmp_path,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        target = tmp_path / "fused" / "gpt2-source-mistral-source"
        assert (target / TARGET_STAMP).is_file()
        uploaded = hub.files("me/tiny-fused")
        local = {p.name: p.read_bytes() for p in target.iterdir() if p.name != TARGET_STAMP}
        assert uploaded == local, sorted(set(uploaded) ^ set(local))
        assert {"model.safetensors", "config.json", "README.md", RECIPE_NAME} <= set(uploaded)
        assert uploaded[RECIPE_NAME].decode() == recipe_text
        card = uploaded["README.md"].decode()
        assert {"fusechat", "fusemerge"} <= set(_front_matter(card)["tags"])
        assert f"source: `{tiny_models['mistral']}`" in card
        assert hub.repos["me/tiny-fused"]["private"] is True
        assert json.loads(hub.requests[0].body)["visibility"] == "private"
        commits = [r for r in hub.requests if r.path.startswith("/api/models/me/tiny-fused/commit/main")]
        summary = json.loads(commits[0].body.splitlines()[0])["value"]["summary"]
        assert summary == "Upload gpt2-source-mistral-source, fused with fusemerge"
        auth = {r.headers.get("authorization") for r in hub.requests if r.path.startswith("/api/")}
        assert auth == {f"Bearer {TOKEN}"}
        assert hub.token_leaks(TOKEN) == []  # every request: path, other headers, bodies, file contents
    assert "pushed fused/gpt2-source-mistral-source to " in run.stdout
    assert TOKEN not in run.stdout + run.stderr and TOKEN[3:20] not in run.stderr
    assert _files_containing(tmp_path, TOKEN.encode()) == []
