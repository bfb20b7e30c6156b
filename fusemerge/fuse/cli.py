"""The `fuse` command: `fusemerge fuse RECIPE [--steps teach,align,train] [-q]`.

    fusemerge fuse recipes/fuse-tiny-cpu.yml                     # teach -> align -> train, then merge.yml
    fusemerge fuse recipes/fusechat-7b.yml --steps teach         # top-K stores of the pivot and every source
    fusemerge fuse recipes/fusechat-7b.yml --steps teach,align   # ... and each source in pivot positions/ids
    accelerate launch --config_file examples/accelerate/deepspeed_zero2.yaml \
        -m fusemerge.cli fuse recipes/fusechat-7b.yml            # teach shards and training on every GPU
    fusemerge fuse recipe.yml --push-to-hub me/OpenChat-3.5-7B   # ... then upload each target
    fusemerge fuse recipes/fusechat-3.0.yml --dry-run            # the plan: steps, models, data, what is done
    fusemerge fuse recipes/fusechat-3.0.yml --steps sample,score # implicit fusion (fusion.kind: implicit)
    fusemerge fuse recipe.yml --baseline                         # ... and the CLM-only baseline beside them
    fusemerge fuse recipe.yml --report                           # per domain: how much of each teacher is used

`fusemerge.cli` registers it. It holds no logic: `run_fuse` does the work.
"""

from __future__ import annotations

from pathlib import Path

import click

from fusemerge.errors import FusemergeError, exit_2_on_user_error
from fusemerge.fuse import IMPLICIT_STEPS, STEPS
from fusemerge.progress import silence_library_progress


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--steps",
    default=None,
    help=f"Comma-separated steps to run; finished work is skipped. Explicit fusion: {','.join(STEPS)}; "
    f"implicit (fusion.kind: implicit): {','.join(IMPLICIT_STEPS)}. [default: all of the recipe's]",
)
@click.option(
    "--dry-run",
    "dry_run",
    is_flag=True,
    help="Validate the recipe and print the plan (steps, models, data, what is done); loads and runs nothing.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.option(
    "--push-to-hub",
    "push_to_hub",
    metavar="REPO_ID",
    help="Upload the fused targets when trained: one target to REPO_ID; several (pairwise fusion) to "
    "REPO_ID-<source name> each; a namespace alone (me/) puts each under its folder name. Needs the "
    "train step; checked before any work starts.",
)
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repos private.")
@click.option(
    "--baseline",
    is_flag=True,
    help="Also train the CLM-only baseline: the pivot fine-tuned on the same data with the same training, "
    "no fusion (OUTPUT/<pivot>-finetune). Not pushed, not merged.",
)
@click.option(
    "--report",
    is_flag=True,
    help="Diagnose instead of training, from the finished teach and align steps: per target and domain, "
    "the positions with a teacher distribution, how often its top-K holds the next token, MinCE's picks "
    "and the fusion term's share of the gradient (also <work_dir>/report.json).",
)
@exit_2_on_user_error
def fuse(
    recipe: Path,
    steps: str | None,
    dry_run: bool,
    quiet: bool,
    push_to_hub: str | None,
    private: bool,
    baseline: bool,
    report: bool,
) -> None:
    """Fuse chat models of different tokenizers as the RECIPE says (FuseChat).

    \b
    Example recipe:
      pivot: openchat/openchat_3.5
      sources: [NousResearch/Nous-Hermes-2-SOLAR-10.7B]
      dataset: {path: data/fusechat_mixture.jsonl, max_length: 2048}
      teacher: {top_k: 10, batch_size: 8}
      output: fused/

    Each source gives one fused target (the pivot trained on its MinCE targets); the command then
    prints where they are and writes OUTPUT/merge.yml, to be run with `fusemerge merge` (printed).
    An interrupted run, rerun with the same command, continues where it stopped. --baseline adds the
    paper's baseline; a recipe with `fusion: {function: none}` (no sources needed) is that fine-tune alone.

    With `fusion: {kind: implicit}` (FuseChat-3.0) the sources answer the prompts, the answers are
    scored, and the pivot is trained on the best (SFT) then on preference pairs (DPO, WRPO).

    \b
    --push-to-hub, for the pivot org/openchat_3.5 and the sources org/Solar, org/Mixtral:
      me/OC-7B  ->  me/OC-7B-Solar and me/OC-7B-Mixtral  (one target: me/OC-7B itself)
      me/       ->  me/openchat_3.5-Solar and me/openchat_3.5-Mixtral  (the folder names)
    The token comes from HF_TOKEN or `hf auth login`; it is never printed.
    """
    from fusemerge.fuse.pipeline import run_fuse

    if quiet:
        silence_library_progress()
    if report:
        from fusemerge.fuse.report import run_report

        if steps or dry_run or push_to_hub or baseline:
            raise FusemergeError(
                "--report runs alone, on the stores of a finished teach and align (--steps teach,align first)",
                key="--report",
            )

        run_report(recipe, echo=click.echo)
        return
    run_fuse(
        recipe,
        steps=None if steps is None else steps.split(","),
        progress=not quiet,
        echo=click.echo,
        push_to_hub=push_to_hub,
        private=private,
        dry_run=dry_run,
        baseline=baseline,
    )
