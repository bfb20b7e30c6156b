"""Knowledge fusion: explicit (FuseChat: teacher pass -> alignment -> MinCE fusion training) and implicit
(FuseChat-3.0: the sources answer, the answers are scored, the pivot learns from the best by SFT and DPO).

The step names live here rather than in `pipeline` so that `fusemerge --help` lists the steps without
importing the recipe models (pydantic) the pipeline needs: about 0.06 s instead of 0.27 s.
"""

from __future__ import annotations

from collections.abc import Iterable

STEPS = ("teach", "align", "train")  # fusion.kind: explicit
IMPLICIT_STEPS = ("sample", "score", "pairs", "sft", "preference")  # fusion.kind: implicit
STEPS_BY_KIND = {"explicit": STEPS, "implicit": IMPLICIT_STEPS}


def checked_steps(steps: Iterable[str] | None, *, kind: str) -> list[str]:
    """The requested steps in pipeline order (all of the kind's when None); a step of the other kind, an
    unknown one or none at all is a FusemergeError naming `--steps`.

    Args:
        steps: what `--steps` asked for (stripped names; empty ones ignored), or None for every step.
        kind: the recipe's `fusion.kind`.
    """
    from fusemerge.errors import FusemergeError

    allowed = STEPS_BY_KIND[kind]
    if steps is None:
        return list(allowed)
    asked = [s.strip() for s in steps if s.strip()]
    for step in asked:
        if step in allowed:
            continue
        other = next((k for k, names in STEPS_BY_KIND.items() if step in names), None)
        if other is not None:
            raise FusemergeError(
                f"step {step!r} is for {other} fusion and this recipe is {kind} "
                f"(fusion.kind); its steps are {', '.join(allowed)}",
                key="--steps",
            )
        raise FusemergeError(f"unknown step {step!r}; steps are {', '.join(allowed)}", key="--steps")
    if not asked:
        raise FusemergeError(f"no step to run; steps are {', '.join(allowed)}", key="--steps")
    return [s for s in allowed if s in asked]
