"""The `fusemerge` command line. It parses arguments and calls the Python API; it holds no logic.

    fusemerge merge recipe.yml merged/ --dry-run
    fusemerge merge recipe.yml merged/
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
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
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
    quiet: bool,
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
    from fusemerge.merge.sizes import parse_size

    run_merge(
        recipe,
        out,
        dry_run=dry_run,
        device=device,
        out_shard_size=parse_size(out_shard_size, what="--out-shard-size"),
        overwrite=overwrite,
        allow_pickle=allow_pickle,
        allow_nonfinite=allow_nonfinite,
        progress=not quiet,
        echo=click.echo,
        engine=engine,
        random_seed=random_seed,
    )


@main.command()
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-out"), show_default=True
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@exit_2_on_user_error
def demo(out: Path, quiet: bool) -> None:
    """Build three small models locally and merge them with variation_ratio and linear (offline)."""
    from fusemerge.demo import run_demo

    run_demo(out, progress=not quiet, echo=click.echo)


main.add_command(fuse)

if __name__ == "__main__":  # pragma: no cover
    main()
