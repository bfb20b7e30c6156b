"""Publishing a finished model folder to the Hugging Face Hub.

    fusemerge push merged/ me/OpenChat-3.5-7B-VaRM --private
    fusemerge merge recipe.yml merged/ --push-to-hub me/OpenChat-3.5-7B-VaRM

    from fusemerge.hub import push_folder
    push_folder("merged/", "me/OpenChat-3.5-7B-VaRM", private=True)

`HfApi.create_repo(exist_ok=True)` then `upload_folder` (resumable in current huggingface_hub releases;
large files go through Xet or LFS as the Hub asks). Only complete folders are pushed: a merge's index is
written last, so a folder without it (or whose state says it is still running) is refused rather than
published half-written. fusemerge's own state (`.fusemerge/`, a fused target's `fusemerge_target.json`
stamp) and unfinished shards never leave the machine.

The token: huggingface_hub finds it (`HF_TOKEN`, or the login saved by `hf auth login`); fusemerge never
reads it from a recipe, never prints or logs it, and scrubs it from any error it turns into a message,
together with anything shaped like a token (`hf_...`): a token typed where the repo id goes is refused
before anything is sent, without echoing it (`check_repo_id`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fusemerge.checkpoint.layout import HUB_IGNORE_PATTERNS, INDEX_NAME, SINGLE_NAME, state_manifest_path
from fusemerge.errors import FusemergeError

LOG = logging.getLogger(__name__)
# User access tokens are "hf_" and 34 letters and digits (older ones "api_..."); a repo name rarely is.
TOKEN_SHAPED = re.compile(r"(?<![A-Za-z0-9])(?:hf|api)_[A-Za-z0-9]{20,}")


def check_repo_id(repo_id: str, *, option: str = "REPO_ID") -> None:
    """Refuse a Hub access token given as the repo id, before any request (it would name a public repo)."""
    if TOKEN_SHAPED.search(repo_id):
        raise FusemergeError(
            f"{option} looks like a Hub access token (hf_...), not a repo id (user/name): the token goes in "
            "HF_TOKEN or `hf auth login`; nothing was sent (consider revoking the token if it was shared)",
            key=option if option.startswith("--") else None,
        )


def check_complete(folder: Path) -> None:
    """Refuse a folder that is not a complete model: weights present, every indexed shard there, not running."""
    if not folder.is_dir():
        raise FusemergeError("not a folder", file=folder)
    state = state_manifest_path(folder)
    if state.is_file():
        try:
            status = json.loads(state.read_text()).get("status")
        except ValueError:
            status = None
        if status != "complete":
            raise FusemergeError(
                "this merge is incomplete (interrupted or still running); rerun the merge first", file=folder
            )
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise FusemergeError(f"unreadable index ({exc})", file=index) from exc
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise FusemergeError(f"the index names missing shard(s): {', '.join(missing[:3])}", file=index)
    elif not (folder / SINGLE_NAME).is_file():
        raise FusemergeError(
            f"no {INDEX_NAME} or {SINGLE_NAME}: not a complete model folder (unfinished merge?)",
            file=folder,
        )


def refresh_card_eval(folder: Path) -> bool:
    """Put the table of `fusemerge_eval.json` into the folder's README.md; True if the card changed."""
    from fusemerge.card import with_eval_section
    from fusemerge.evaluate import EVAL_FILE, EvalReport

    report_path, card_path = folder / EVAL_FILE, folder / "README.md"
    if not (report_path.is_file() and card_path.is_file()):
        return False
    try:
        report = EvalReport.from_json(report_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise FusemergeError(f"not valid JSON ({exc})", file=report_path) from exc
    card = card_path.read_text(encoding="utf-8")
    updated = with_eval_section(card, report)
    if updated == card:
        return False
    card_path.write_text(updated, encoding="utf-8")
    return True


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    echo: Callable[[str], Any] = print,
) -> str:
    """Create the repo if needed and upload a complete model folder; returns the commit URL.

    Args:
        folder: a complete model folder (a finished merge or fused target).
        repo_id: "user/name" or "org/name" on the Hub.
        private: create the repo private (an existing repo keeps its visibility).
        revision: a branch to push to; created from the default branch if missing.
        commit_message: defaults to "Upload <folder name> with fusemerge".
        token: a token object for callers that hold one; by default huggingface_hub finds it
            (HF_TOKEN or the saved login). It is never printed.
        echo: where one-line status messages go.
    """
    folder = Path(folder)
    check_repo_id(repo_id)
    check_complete(folder)
    if refresh_card_eval(folder):
        echo(f"model card: evaluation table updated from {folder / 'fusemerge_eval.json'}")
    from huggingface_hub import HfApi, get_token

    secret = token or get_token()
    api = HfApi(token=token)
    message = commit_message or f"Upload {folder.resolve().name} with fusemerge"
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            revision=revision,
            commit_message=message,
            ignore_patterns=HUB_IGNORE_PATTERNS,
        )
    except Exception as exc:
        raise _user_error(exc, repo_id, secret) from None
    echo(f"pushed {folder} to {url}" + (f" (branch {revision})" if revision else ""))
    return str(getattr(info, "commit_url", info))


def _user_error(exc: Exception, repo_id: str, secret: str | None) -> Exception:
    """A Hub failure as one line without the token; anything that is not a Hub/network error stays a bug.

    `from None` at the raise site drops the original exception (its request headers could hold the token).
    """
    from huggingface_hub.errors import HfHubHTTPError

    text = _scrub(" ".join(str(exc).split()), secret)
    repo_id = _scrub(repo_id, secret)
    if isinstance(exc, HfHubHTTPError):
        status = getattr(exc.response, "status_code", None)
        hint = {
            401: "not logged in or the token is invalid: run `hf auth login` or set HF_TOKEN",
            403: "the token may not write to this namespace (a write token is needed)",
        }.get(status or 0, "")
        return FusemergeError(f"the Hub refused the push of {repo_id}: {hint + '; ' if hint else ''}{text}")
    if isinstance(exc, OSError | ValueError) or type(exc).__module__.startswith(("httpx", "requests")):
        return FusemergeError(f"push of {repo_id} failed: {type(exc).__name__}: {text}")
    return RuntimeError(_scrub(f"push of {repo_id} failed: {type(exc).__name__}: {text}", secret))


def _scrub(text: str, secret: str | None) -> str:
    """`text` without the token and without anything shaped like one (a token typed in the wrong place)."""
    return TOKEN_SHAPED.sub("***", text.replace(secret, "***") if secret else text)
