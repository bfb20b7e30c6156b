"""Wrong fuse inputs are found before the first forward pass: one line naming the recipe key, exit 2.

Each case used to fail late (after the pivot's teacher pass, an hour of GPU on the 7B recipe), crash
with a traceback, or pass: a missing source path, a folder without tokenizer files, a vocabulary smaller
than top_k, the pivot under a second path, an unwritable output, an `<unk>`-heavy teacher, a non-UTF-8
dataset line, an invalid .jinja template, the pivot listed as a source.
"""

from __future__ import annotations

import errno
import os
from collections import Counter
from pathlib import Path

import pytest

import fusemerge.fuse.inputs as inputs_module
from fusemerge.errors import FusemergeError
from fusemerge.fuse.data import build_chat_data
from fusemerge.fuse.inputs import FuseInputChecks
from fusemerge.fuse.recipe import load_fuse_recipe
from fusemerge.lm.loading import load_tokenizer
from fusemerge.lm.unknown import UNKNOWN_SHARE_LIMIT, WARN_SHARE
from tests.faults.conftest import assert_one_line_exit_2
from tests.faults.fuse_fixtures import (
    build_fuse_models,
    fuse_recipe,
    run_fuse_cli,
    teacher_stores,
    try_mount_tmpfs,
    unmount,
    word_level_tokenizer,
)


@pytest.fixture(scope="module")
def fuse_models(tmp_path_factory):
    return build_fuse_models(tmp_path_factory.mktemp("fuse-models"))


def _refused_up_front(recipe: Path, *expected: str) -> str:
    line = assert_one_line_exit_2(run_fuse_cli(recipe))
    for text in expected:
        assert text in line, line
    assert not teacher_stores(recipe.parent / "out"), "a teacher pass ran before the check"
    assert "Traceback" not in line
    return line


@pytest.mark.parametrize("missing", ["nope", "../elsewhere/nope"])
def test_a_missing_source_folder_is_refused_before_any_teacher_pass(tmp_path, fuse_models, missing):
    recipe = fuse_recipe(tmp_path, fuse_models, sources=[str(tmp_path / missing)])
    line = _refused_up_front(recipe, f"{recipe}:3, key 'sources[0].model'", "no such model folder")
    assert "Repo id must be" not in line


def test_a_model_folder_without_tokenizer_files_is_refused(tmp_path, fuse_models):
    recipe = fuse_recipe(tmp_path, fuse_models, sources=[str(fuse_models["no-tokenizer"])])
    _refused_up_front(recipe, "key 'sources[0].model'", "no tokenizer files")


def test_a_pivot_without_tokenizer_files_is_refused_not_blamed_on_the_chat_template(tmp_path, fuse_models):
    recipe = fuse_recipe(tmp_path, fuse_models, pivot=str(fuse_models["no-tokenizer"]))
    line = _refused_up_front(recipe, "key 'pivot.model'", "no tokenizer files")
    assert "chat template" not in line


def test_a_vocabulary_smaller_than_top_k_is_refused(tmp_path, fuse_models):
    recipe = fuse_recipe(
        tmp_path,
        fuse_models,
        sources=[str(fuse_models["unk"])],
        teacher={"top_k": 8, "device": "cpu", "shard_size": 4},
    )
    _refused_up_front(recipe, "key 'teacher.top_k'", "top_k 8 is more than the 5 ids", "unk")


@pytest.mark.parametrize("spelling", ["slash", "dot", "relative", "symlink"])
def test_the_pivot_under_another_path_is_refused(tmp_path, fuse_models, monkeypatch, spelling):
    pivot = fuse_models["pivot"]
    if spelling == "slash":
        other = f"{pivot}/"
    elif spelling == "dot":
        other = f"{pivot}/."
    elif spelling == "relative":
        monkeypatch.chdir(tmp_path)
        other = os.path.relpath(pivot, tmp_path)  # ../.../pivot
    else:
        (tmp_path / "link").symlink_to(pivot, target_is_directory=True)
        other = str(tmp_path / "link")
    recipe = fuse_recipe(tmp_path, fuse_models, sources=[other])
    line = _refused_up_front(recipe, "key 'sources", "pivot")
    assert "same folder" in line or "is also the pivot" in line, line


def test_the_pivot_as_a_source_is_a_short_line_not_the_recipe(tmp_path, fuse_models):
    recipe = fuse_recipe(tmp_path, fuse_models, sources=[str(fuse_models["pivot"])])
    line = _refused_up_front(recipe, "key 'sources'", "is also the pivot")
    # short apart from the paths it names (their length is the temporary folder's, not the message's)
    bare = line.replace(str(recipe), "RECIPE").replace(str(fuse_models["pivot"]), "PIVOT")
    assert "'dataset'" not in line and "raw_yaml" not in line and len(bare) < 200, line


def test_an_unwritable_output_is_found_before_the_work(tmp_path, fuse_models, monkeypatch):
    real = inputs_module.tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):  # noqa: A002  (tempfile's own keyword)
        if Path(dir) == tmp_path / "out":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(inputs_module.tempfile, "mkstemp", read_only)
    recipe = fuse_recipe(tmp_path, fuse_models, work_dir=str(tmp_path / "work"))
    _refused_up_front(recipe, "key 'output'", "Read-only file system")


def test_a_read_only_mount_is_found_before_the_work(tmp_path, fuse_models):
    ro = tmp_path / "ro"
    if not try_mount_tmpfs(ro, "ro", "size=64k"):
        pytest.skip("cannot mount a read-only tmpfs here (not root)")
    try:
        recipe = fuse_recipe(tmp_path, fuse_models, output=str(ro / "out"))
        line = assert_one_line_exit_2(run_fuse_cli(recipe))
        assert "key 'output'" in line and "Read-only file system" in line, line
    finally:
        unmount(ro)


def test_an_unk_heavy_teacher_is_refused_before_its_teacher_pass(tmp_path, fuse_models):
    recipe = fuse_recipe(tmp_path, fuse_models, sources=[str(fuse_models["unk"])])
    _refused_up_front(recipe, "key 'sources[0].model'", "unknown tokens (<unk>)", "more than 1% is refused")


def test_a_few_unknown_bytes_warn_and_pass(tmp_path, fuse_models):
    """A teacher between WARN_SHARE and UNKNOWN_SHARE_LIMIT: one warning line, no refusal."""
    from tokenizers.pre_tokenizers import Whitespace

    recipe = load_fuse_recipe(fuse_recipe(tmp_path, fuse_models))
    data = build_chat_data(recipe.dataset, load_tokenizer(str(fuse_models["pivot"])))
    pieces = Counter(
        w for s in data.sequences for a, b in s.spans for w, _ in Whitespace().pre_tokenize_str(s.text[a:b])
    )
    total = sum(len(s.text[a:b].encode()) for s in data.sequences for a, b in s.spans)
    share = {w: n * len(w.encode()) / total for w, n in pieces.items()}
    missing = next(w for w, v in sorted(share.items()) if WARN_SHARE < v < UNKNOWN_SHARE_LIMIT / 2)
    tokenizer = word_level_tokenizer([w for w in pieces if w != missing])
    lines: list[str] = []
    FuseInputChecks(recipe, {"sources[0]": tokenizer}, None).check_data(data, echo=lines.append)
    assert len(lines) == 1 and lines[0].startswith("fusemerge: warning: ") and "unknown tokens" in lines[0]
    refused = word_level_tokenizer([w for w in pieces if share[w] < 0.02])  # drops the common words
    with pytest.raises(FusemergeError, match="more than 1% is refused"):
        FuseInputChecks(recipe, {"sources[0]": refused}, None).check_data(data, echo=lines.append)


def test_a_non_utf8_line_is_skipped_naming_file_line_and_byte(tmp_path, fuse_models):
    good = fuse_models["data"].read_bytes().splitlines(keepends=True)[:3]
    bad = b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "ok"}]}\n'
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b"".join(good) + bad)
    offset = len(b"".join(good)) + bad.index(b"\xe9")
    recipe = fuse_recipe(tmp_path, fuse_models, dataset={"path": str(data), "on_bad_record": "error"})
    line = _refused_up_front(recipe, f"{data}:4", "not UTF-8", f"byte 0xe9 at byte {offset}")
    assert "UnicodeDecodeError" not in line


def test_an_invalid_jinja_template_fails_once_naming_the_template(tmp_path, fuse_models):
    template = tmp_path / "broken.jinja"
    template.write_text("{% for m in messages %}\n{{ m.content }\n{% endfor %}\n")
    recipe = fuse_recipe(tmp_path, fuse_models, chat_template=str(template))
    result = run_fuse_cli(recipe)
    line = assert_one_line_exit_2(result)
    assert line.startswith(f"fusemerge: error: {template}:2: not a valid Jinja chat template"), line
    assert "skipped record" not in result.output and str(fuse_models["data"]) not in line
