"""Implicit fusion through `fusemerge fuse`: the recipe's kind and its keys, the steps, and a whole run.

The steps themselves (resumption, kill -9, scorers, losses) are tested beside their modules; here the
wiring: a recipe with `fusion: {kind: implicit}` runs sample -> score -> pairs -> sft -> preference from
the CLI on tiny models, a rerun skips every step, and a wrong recipe or step stops with one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from implicit_helpers import write_jsonl

from fusemerge.checkpoint.layout import TARGET_STAMP
from fusemerge.errors import FusemergeError
from fusemerge.fuse.cli import fuse
from fusemerge.fuse.pipeline import run_fuse
from fusemerge.fuse.recipe import load_fuse_recipe

IMPLICIT = """\
pivot: org/pivot-8b
sources: [org/source-a, org/source-b]
dataset: {path: prompts.jsonl}
fusion: {kind: implicit}
implicit:
  scoring:
    default: reward_model
    domains: {math: math_answer}
    reward_model: {model: org/reward-model}
training: {mode: lora}
output: out/
"""

EXPLICIT = """\
pivot: org/pivot-8b
sources: [org/source-a]
dataset: {path: chat.jsonl}
teacher: {top_k: 10}
output: out/
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yml"
    path.write_text(text, encoding="utf-8")
    return path


def _error(path: Path) -> str:
    with pytest.raises(FusemergeError) as info:
        load_fuse_recipe(path)
    return str(info.value)


def test_an_implicit_recipe_validates_and_an_explicit_one_is_unchanged(tmp_path):
    recipe = load_fuse_recipe(_write(tmp_path, IMPLICIT))
    assert (
        recipe.fusion.kind == "implicit" and recipe.implicit.scoring.reward_model.model == "org/reward-model"
    )
    explicit = load_fuse_recipe(_write(tmp_path, EXPLICIT))
    assert explicit.fusion.kind == "explicit" and explicit.implicit is None


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (  # explicit-only keys in an implicit recipe: all named, at the first one's line
            IMPLICIT.replace(
                "fusion: {kind: implicit}", "fusion: {kind: implicit, lambda: 0.9}\nteacher: {}"
            ),
            ":4: explicit-fusion keys in an implicit recipe (fusion.kind: implicit): teacher, fusion.lambda",
        ),
        (
            IMPLICIT + "alignment: {tokens: dtw}\n",
            ":12: explicit-fusion keys in an implicit recipe (fusion.kind: implicit): alignment",
        ),
        (  # implicit: in an explicit recipe
            EXPLICIT + "implicit: {}\n",
            ":6: implicit: only for implicit fusion; set fusion: {kind: implicit} or remove it",
        ),
        (
            IMPLICIT.replace("    reward_model: {model: org/reward-model}\n", ""),
            ":5, key 'implicit': Value error, scoring uses reward_model: give scoring.reward_model.model",
        ),
        (IMPLICIT.replace("kind: implicit", "kind: implict"), ":4, key 'fusion.kind'"),
        (
            IMPLICIT.replace("implicit:\n  scoring:", "x:\n  scoring:"),
            ":5, key 'x': unknown key",
        ),
        (
            IMPLICIT.replace("dataset: {path: prompts.jsonl}\n", ""),
            "dataset: required key is missing (the prompts",
        ),
        (
            EXPLICIT.replace("dataset: {path: chat.jsonl}\n", ""),
            "dataset: required key is missing (the chat data",
        ),
        (
            "pivot: a/b\nsources: [c/d]\nfusion: {kind: implicit}\noutput: o/\n",
            "implicit: required section is missing",
        ),
    ],
)
def test_bad_implicit_recipes_name_file_line_and_key(tmp_path, text, where):
    message = _error(_write(tmp_path, text))
    assert message.startswith(str(tmp_path / "recipe.yml")) and where in message, message


def test_prepared_data_for_every_stage_needs_no_dataset_nor_reward_model(tmp_path):
    text = IMPLICIT.replace("dataset: {path: prompts.jsonl}\n", "").replace(
        "implicit:\n", "implicit:\n  sft_data: {path: sft.jsonl}\n  preference_data: {path: dpo.jsonl}\n"
    )
    text = text.replace("    reward_model: {model: org/reward-model}\n", "")
    recipe = load_fuse_recipe(_write(tmp_path, text))
    assert recipe.dataset is None and recipe.implicit.sft_data.path == "sft.jsonl"


@pytest.mark.parametrize(
    ("text", "steps", "message"),
    [
        (IMPLICIT, "teach", "step 'teach' is for explicit fusion and this recipe is implicit"),
        (EXPLICIT, "sample,train", "step 'sample' is for implicit fusion and this recipe is explicit"),
        (IMPLICIT, "distill", "unknown step 'distill'; steps are sample, score, pairs, sft, preference"),
        (IMPLICIT, ",", "no step to run"),
    ],
)
def test_a_step_of_the_other_kind_is_a_user_error(tmp_path, text, steps, message):
    result = CliRunner().invoke(fuse, [str(_write(tmp_path, text)), "--steps", steps, "--dry-run"])
    assert result.exit_code == 2 and message in result.output, result.output
    assert "key '--steps'" in result.output


def test_push_needs_the_last_stage(tmp_path):
    path = _write(tmp_path, IMPLICIT)
    with pytest.raises(FusemergeError, match="add the preference step"):
        run_fuse(path, steps=["sample", "sft"], push_to_hub="me/fused", dry_run=True)


def test_the_push_goes_to_the_final_target(tmp_path, monkeypatch):
    from fusemerge.fuse.implicit.pipeline import implicit_repo_ids

    monkeypatch.chdir(tmp_path)
    recipe = load_fuse_recipe(_write(tmp_path, IMPLICIT))
    assert implicit_repo_ids(recipe, "me/") == {Path("out/pivot-8b-implicit"): "me/pivot-8b-implicit"}
    assert implicit_repo_ids(recipe, "me/Fused-8B") == {Path("out/pivot-8b-implicit"): "me/Fused-8B"}
    with pytest.raises(FusemergeError, match="not a valid Hub repo id"):
        implicit_repo_ids(recipe, "me/bad name")


# -- a whole run on tiny models ---------------------------------------------------------------------------
def _prompts(count: int) -> list[dict]:
    """Instruction prompts (the reward model scores every response: pairs always have a reward gap)."""
    return [
        {"messages": [{"role": "user", "content": f"Say something about the number {i}."}]}
        for i in range(count)
    ]


@pytest.fixture()
def e2e_recipe(tmp_path, chat_models, reward_model_dir) -> Path:
    write_jsonl(tmp_path / "prompts.jsonl", _prompts(8))
    body = {
        "pivot": str(chat_models["pivot"]),
        "sources": [str(chat_models["qwen"])],
        "dataset": {"path": str(tmp_path / "prompts.jsonl")},
        "fusion": {"kind": "implicit"},
        "implicit": {
            "sampling": {
                "samples": 2,
                "max_new_tokens": 6,
                "temperature": 1.0,
                "batch_size": 4,
                "shard_size": 4,
            },
            "scoring": {"default": "reward_model", "reward_model": {"model": str(reward_model_dir)}},
            "pairs": {"sft_fraction": 0.5},
            "preference": {
                "loss": "wrpo",
                "beta": 0.5,
                "learning_rate": 5e-3,
                "max_steps": 2,
                "max_length": 96,
            },
        },
        "training": {
            "mode": "full",
            "learning_rate": 5e-3,
            "warmup_ratio": 0.0,
            "lr_scheduler": "constant",
            "batch_size": 2,
            "gradient_accumulation": 1,
            "max_steps": 2,
            "save_steps": 1,
            "logging_steps": 1,
            "seed": 7,
        },
        "output": str(tmp_path / "out"),
    }
    path = tmp_path / "implicit.yml"
    path.write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    return path


def test_fuse_runs_every_implicit_step_from_the_cli_and_a_rerun_skips_them(e2e_recipe, tmp_path, chat_models):
    runner = CliRunner()
    plan = runner.invoke(fuse, [str(e2e_recipe), "--dry-run"])
    assert plan.exit_code == 0, plan.output
    assert "prompts: " in plan.output and "(8 records)" in plan.output and "sample: to do" in plan.output

    result = runner.invoke(fuse, [str(e2e_recipe), "-q"])
    assert result.exit_code == 0, result.output
    out, work = tmp_path / "out", tmp_path / "out" / "work" / "implicit"
    for name in ("pivot", "qwen-source"):
        assert (work / "samples" / name / "shard-00001.jsonl").is_file()
        assert (work / "scores" / name / "shard-00001.jsonl").is_file()
    pairs = [json.loads(line) for line in (work / "preference.jsonl").read_text().splitlines()]
    assert pairs and all("chosen_target" in p for p in pairs)  # the pivot answered: WRPO has its target
    sft, final = out / "pivot-implicit-sft", out / "pivot-implicit"
    for target in (sft, final):
        assert (target / TARGET_STAMP).is_file() and (target / "model.safetensors").is_file()
    card = (final / "README.md").read_text()
    assert (
        f"- source: `{chat_models['qwen']}`" in card and f"- pivot (base): `{chat_models['pivot']}`" in card
    )
    assert "SFT then preference optimisation (wrpo)" in card
    assert (final / "fusemerge_recipe.yml").read_text() == e2e_recipe.read_text()
    assert (
        json.loads((final / TARGET_STAMP).read_text())["policy"]["stage"] == "sft"
    )  # trained from the SFT target

    stamps = {t: (t / TARGET_STAMP).stat().st_mtime_ns for t in (sft, final)}
    again = runner.invoke(fuse, [str(e2e_recipe), "-q"])
    assert again.exit_code == 0, again.output
    skipped = [line.split(":")[0] for line in again.output.splitlines() if "skipped" in line]
    assert skipped == [
        "sample pivot",
        "sample qwen-source",
        "score pivot",
        "score qwen-source",
        "pairs",
        "sft pivot-implicit-sft",
        "preference pivot-implicit",
    ], again.output
    assert stamps == {t: (t / TARGET_STAMP).stat().st_mtime_ns for t in (sft, final)}

    done = runner.invoke(fuse, [str(e2e_recipe), "--dry-run"])
    assert done.exit_code == 0 and "to do" not in done.output, done.output


def test_a_second_run_of_the_same_work_dir_is_refused(e2e_recipe, tmp_path):
    import multiprocessing

    work = tmp_path / "out" / "work" / "implicit"
    work.mkdir(parents=True)
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(work, ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(FusemergeError, match="another implicit fuse is writing this folder"):
            run_fuse(e2e_recipe, steps=["pairs"], progress=False, echo=lambda _: None)
    finally:
        release.set()
        holder.join(30)


def _hold(folder: Path, ready, release) -> None:
    from fusemerge.checkpoint.layout import exclusive_lock

    with exclusive_lock(folder, what="implicit fuse"):
        ready.set()
        release.wait(30)


def test_preference_without_a_finished_sft_target_is_a_user_error(e2e_recipe):
    with pytest.raises(FusemergeError, match="no finished SFT target"):
        run_fuse(e2e_recipe, steps=["preference"], progress=False, echo=lambda _: None)


def test_training_without_pairs_says_which_step_makes_them(e2e_recipe):
    with pytest.raises(FusemergeError, match="no sft data: run the pairs step first"):
        run_fuse(e2e_recipe, steps=["sft"], progress=False, echo=lambda _: None)


def test_prepared_data_skips_the_data_steps_and_trains_both_stages(tmp_path, chat_models):
    from train_helpers import preference_rows, sft_rows

    write_jsonl(tmp_path / "sft.jsonl", sft_rows(4))
    write_jsonl(tmp_path / "dpo.jsonl", preference_rows(4))
    small = {"max_steps": 1, "batch_size": 2, "gradient_accumulation": 1, "save_steps": 1, "seed": 7}
    body = {
        "pivot": str(chat_models["pivot"]),
        "sources": ["org/source-a"],  # named in the card only: the data came from it
        "fusion": {"kind": "implicit"},
        "implicit": {
            "sft_data": {"path": str(tmp_path / "sft.jsonl")},
            "preference_data": {"path": str(tmp_path / "dpo.jsonl")},
            "preference": {"loss": "ln_dpo", "beta": 2.0, "max_steps": 1, "max_length": 96},
        },
        "training": {"mode": "lora", "lora_r": 4, "lora_alpha": 8, **small},
        "output": str(tmp_path / "out"),
    }
    recipe = tmp_path / "prepared.yml"
    recipe.write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    lines: list[str] = []
    made = run_fuse(recipe, progress=False, echo=lines.append)
    assert [line for line in lines if "nothing to do" in line] == [
        f"{step}: nothing to do, prepared data (implicit.sft_data / preference_data) covers every stage"
        for step in ("sample", "score", "pairs")
    ]
    final = made["target/pivot-implicit"]
    assert final == tmp_path / "out" / "pivot-implicit" and (final / TARGET_STAMP).is_file()
    card = (final / "README.md").read_text()
    assert f"- `{tmp_path / 'dpo.jsonl'}`" in card and "- source: `org/source-a`" in card
    assert not (tmp_path / "out" / "work" / "implicit" / "samples").exists()
