"""The `fusemerge` command line. It parses arguments and calls the Python API; it holds no logic.

    fusemerge merge recipe.yml merged/ --dry-run
    fusemerge merge recipe.yml merged/
    fusemerge eval pivot/ merged/ --data heldout.jsonl
    fusemerge push merged/ me/my-merge --private
    fusemerge demo

Heavy imports happen inside each command so that `fusemerge --help` answers at once. A `FusemergeError`
(a user mistake) is printed as one line and exits with code 2.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from fusemerge import __version__
from fusemerge.errors import exit_2_on_user_error
from fusemerge.fuse.cli import fuse
from fusemerge.progress import silence_library_progress


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fusemerge")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
def main(verbose: bool) -> None:
    """Fuse chat LLMs of different tokenizers (FuseChat) and merge them memory-efficiently.

    \b
    Example:
      fusemerge merge recipe.yml merged/ --dry-run   # the plan: tensors, bytes, peak memory
      fusemerge merge recipe.yml merged/             # stream the merge, shard by shard
    """
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Print the plan (tensors, bytes, peak memory); write nothing.")
@click.option("--device", default="cpu", show_default=True, help="Where the arithmetic runs: cpu or cuda.")
@click.option(
    "--out-shard-size",
    default="5GB",
    show_default=True,
    help="Largest output shard in bytes (suffixes KB, MB, GB, KiB, MiB, GiB).",
)
@click.option("--overwrite", is_flag=True, help="Replace whatever OUT holds.")
@click.option("--allow-pickle", is_flag=True, help="Accept pickle (*.bin) checkpoints. They can run code.")
@click.option("--allow-nonfinite", is_flag=True, help="Merge inputs holding NaN/Inf instead of stopping.")
@click.option(
    "--engine",
    type=click.Choice(["auto", "streaming", "mergekit"]),
    default="auto",
    show_default=True,
    help="streaming, or mergekit as the fallback (slices, modules, tokenizer surgery, MoE); auto picks.",
)
@click.option(
    "--random-seed",
    type=int,
    default=None,
    help="Seed of the random methods (DARE, DELLA); the same seed gives the same model. Default 0.",
)
@click.option(
    "--strict",
    is_flag=True,
    help="A parameter the method does not use is an error (default: ignored with a warning, as mergekit does).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.option(
    "--push-to-hub", "push_to_hub", metavar="REPO_ID", help="Upload OUT to this Hub repo when done."
)
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repo private.")
@exit_2_on_user_error
def merge(
    recipe: Path,
    out: Path,
    dry_run: bool,
    device: str,
    out_shard_size: str,
    overwrite: bool,
    allow_pickle: bool,
    allow_nonfinite: bool,
    engine: str,
    random_seed: int | None,
    strict: bool,
    quiet: bool,
    push_to_hub: str | None,
    private: bool,
) -> None:
    """Merge the models of a mergekit-style RECIPE into the folder OUT.

    \b
    Example recipe (VaRM, the FuseChat merge):
      merge_method: variation_ratio
      base_model: openchat/openchat_3.5
      models:
        - model: FuseAI/OpenChat-3.5-7B-Mixtral
        - model: FuseAI/OpenChat-3.5-7B-Solar
      dtype: bfloat16

    An interrupted merge, rerun with the same command, resumes at its first unfinished shard.
    """
    from fusemerge.merge.api import run_merge
    from fusemerge.merge.options import MergeOptions
    from fusemerge.merge.sizes import parse_size

    if push_to_hub:
        from fusemerge.hub import check_repo_id

        check_repo_id(push_to_hub, option="--push-to-hub")  # before the merge, not after it

    options = MergeOptions(
        dry_run=dry_run,
        device=device,
        out_shard_size=parse_size(out_shard_size, what="--out-shard-size"),
        overwrite=overwrite,
        allow_pickle=allow_pickle,
        allow_nonfinite=allow_nonfinite,
        progress=not quiet,
        engine=engine,
        random_seed=random_seed,
        strict=strict,
    )
    run_merge(recipe, out, options, echo=click.echo)
    if push_to_hub and not options.dry_run:
        from fusemerge.hub import push_folder

        push_folder(out, push_to_hub, private=private, echo=click.echo)


@main.command("eval")
@click.argument("models", nargs=-1, required=True)
@click.option(
    "--data",
    "data_files",
    multiple=True,
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="JSONL chat records (OpenAI or ShareGPT); repeat for one file per domain.",
)
@click.option("--domain-field", default="domain", show_default=True, help="Record key naming its domain.")
@click.option(
    "--chat-template",
    default=None,
    help="Render every conversation with this template (chatml, openchat or a .jinja file) instead of "
    "the first model's.",
)
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--max-length",
    default=2048,
    show_default=True,
    type=click.IntRange(min=8),
    help="Longest sequence in the first model's tokens; longer conversations are split between rounds.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON on stdout.")
@click.option(
    "--save-to",
    type=click.Path(file_okay=False, path_type=Path),
    help="Also write fusemerge_eval.json into this model folder (its card gets the table).",
)
@click.option("--allow-pickle", is_flag=True, help="Accept pickle (*.bin) checkpoints. They can run code.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@exit_2_on_user_error
def eval_(
    models: tuple[str, ...],
    data_files: tuple[Path, ...],
    domain_field: str,
    chat_template: str | None,
    batch_size: int,
    device: str,
    max_length: int,
    as_json: bool,
    save_to: Path | None,
    allow_pickle: bool,
    quiet: bool,
) -> None:
    """Held-out loss of MODELS on the assistant turns of chat data, per domain, side by side.

    \b
    Example:
      fusemerge eval pivot/ fused/ merged/ --data heldout.jsonl
      fusemerge eval pivot/ merged/ --data code.jsonl --data chat.jsonl --json

    Bits per byte compares models of different tokenizers fairly: every model reads the same text
    (rendered with the first model's chat template) and its loss is divided by the bytes it covers.
    """
    from fusemerge.evaluate import check_save_to, evaluate_models
    from fusemerge.hub import refresh_card_eval

    if quiet:
        silence_library_progress()
    if save_to is not None:
        check_save_to(save_to)  # before the evaluation, not after it
    report = evaluate_models(
        list(models),
        list(data_files),
        domain_field=domain_field,
        chat_template=chat_template,
        batch_size=batch_size,
        device=device,
        max_length=max_length,
        allow_pickle=allow_pickle,
        progress=not quiet,
    )
    click.echo(report.to_json() if as_json else report.table(), nl=not as_json)
    if save_to is not None:
        path = report.save(save_to)
        refresh_card_eval(save_to)
        click.echo(f"saved {path}", err=True)


@main.command()
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (an existing one keeps its setting).")
@click.option("--revision", metavar="BRANCH", help="Push to this branch (created if missing).")
@click.option("--commit-message", help="Commit message (default: 'Upload <folder> with fusemerge').")
@exit_2_on_user_error
def push(folder: Path, repo_id: str, private: bool, revision: str | None, commit_message: str | None) -> None:
    """Upload a complete model FOLDER to the Hub repo REPO_ID (created if missing).

    \b
    Example:
      fusemerge push merged/ me/OpenChat-3.5-7B-VaRM --private

    The token comes from HF_TOKEN or `hf auth login`; it is never printed. fusemerge's state folder
    (.fusemerge/) and unfinished shards are not uploaded; an unfinished merge is refused.
    """
    from fusemerge.hub import push_folder

    push_folder(
        folder, repo_id, private=private, revision=revision, commit_message=commit_message, echo=click.echo
    )


@main.command()
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The demo's folder  [default: demo-out; with --implicit: demo-out/implicit]",
)
@click.option(
    "--merge-only",
    is_flag=True,
    help="Seconds instead of minutes: only show what VaRM does that averaging does not (no training).",
)
@click.option(
    "--implicit",
    is_flag=True,
    help="Implicit fusion (FuseChat-3.0) instead: sample, score, pairs, SFT, DPO and WRPO on arithmetic.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@exit_2_on_user_error
def demo(out: Path | None, merge_only: bool, implicit: bool, quiet: bool) -> None:
    """FuseChat end to end, offline, on small models trained on the spot (minutes on a laptop CPU).

    \b
    Trains a pivot and two specialists (Python code, English chat) with three different real
    tokenizers, fuses each specialist into the pivot (teacher pass, alignment, MinCE training),
    trains the paper's CLM-only baseline, merges the fused models with VaRM and with linear, and
    prints held-out bits per byte per domain for all of them (also OUT/results.json, OUT/results.png).
    A rerun reuses the finished stages. Exits with status 3 when one of the claims it checks (each fused
    model beats CLM-only on its specialist's domain; VaRM no worse than linear, within 0.01%) did not hold.

    \b
    --implicit: implicit fusion instead, on arithmetic a program checks: a weak pivot
    and an addition and a multiplication specialist answer prompts, math_answer scores them, the pivot is
    fine-tuned on the best answers (SFT) and then on right-vs-wrong pairs (DPO, WRPO); held-out
    accuracy of every model, and exit status 3 unless each SFT + preference target beats the pivot and
    the SFT-only target.
    """
    if quiet:
        silence_library_progress()
    # The implicit demo's own default folder: its data/, models/ and results would clash with the fusion demo's.
    out = out or (Path("demo-out") / "implicit" if implicit else Path("demo-out"))
    if merge_only:
        from fusemerge.demo.merge_only import run_demo

        run_demo(out / "merge-only", progress=not quiet, echo=click.echo)  # apart from the fusion demo's
        return
    if implicit:
        from fusemerge.demo.implicit import ImplicitDemoPlan, run_implicit_demo
        from fusemerge.demo.report import implicit_claims

        implicit_plan = ImplicitDemoPlan()
        found = run_implicit_demo(out, implicit_plan, progress=not quiet, echo=click.echo)
        held = implicit_claims(found, implicit_plan.losses)
    else:
        from fusemerge.demo.fusion import DemoPlan, run_fusion_demo
        from fusemerge.demo.report import claims

        plan = DemoPlan()
        result = run_fusion_demo(out, plan, progress=not quiet, echo=click.echo)
        held = claims(result, [d for d, _ in plan.specialists])
    failed = [claim for claim, ok in held.items() if not ok]
    if failed:
        click.echo(f"fusemerge demo: claim did not hold: {'; '.join(failed)} (exit status 3)", err=True)
        raise SystemExit(3)


main.add_command(fuse)


def run() -> None:
    """The console script: `main`, then an exit that skips what only returns memory to a dying process.

    At interpreter exit Python's final garbage collections walk every object still alive, and after a
    merge that is mostly numba's typing and code registries (and scipy, which numba imports to look for a
    BLAS): 0.1-0.3 s of a 2.5 s merge of a 1.1B model, measured, to free memory the OS takes back anyway.
    `gc.freeze()` moves those objects out of the collector's sight; files, locks and buffers are released
    as before (by reference counting and the `finally` blocks that already ran). Only here, in the process
    entry point: `main` called in-process (tests, notebooks) keeps the collector as it was.
    """
    import gc

    try:
        main()
    finally:
        gc.freeze()


if __name__ == "__main__":  # pragma: no cover
    run()
