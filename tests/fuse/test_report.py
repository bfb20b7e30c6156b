"""`fuse --report`: coverage, top-K hits, MinCE's picks and the gradient shares, checked by hand on tiny cases."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fusemerge.fuse.loss import IGNORE_INDEX
from fusemerge.fuse.report import (
    DomainReport,
    alignment_counts,
    gradient_norms,
    report_lines,
    selection_counts,
    selection_lines,
)
from fusemerge.fuse.store import TopKStore

NEG = -np.inf


def test_coverage_and_hits_of_one_sequence_by_hand():
    # pivot tokens 5 6 7 8 9; trained positions: 1 (gold 7), 2 (gold 8), 3 (gold 9); position 0 and 4 are not
    tokens = np.array([5, 6, 7, 8, 9])
    trained = np.array([False, True, True, True, False])
    pivot = np.array([[6, 1], [7, 1], [2, 3], [9, 8], [0, 1]])  # own top-2 lists gold at 1 and 3: 2 hits
    aligned = np.array([[6, -1], [7, -1], [8, 4], [3, 4], [-1, -1]])
    lp = np.array([[-0.5, NEG], [0.0, NEG], [-0.1, -2.0], [-0.3, -1.0], [NEG, NEG]], dtype=np.float16)
    # row 1: only the gold token at log-prob 0 = the align step's fallback, not a teacher distribution
    # row 2: a teacher distribution that lists gold 8 (a hit); row 3: one that does not list gold 9
    assert alignment_counts(tokens, trained, pivot, aligned, lp) == (3, 2, 1, 2)
    # a teacher row listing the gold token alone but with log-prob < 0 is still the teacher's
    lp2 = lp.copy()
    lp2[1, 0] = -0.2
    assert alignment_counts(tokens, trained, pivot, aligned, lp2) == (3, 3, 2, 2)


def _store(path, metric_ce, per_byte) -> TopKStore:
    n = len(metric_ce)
    store = TopKStore.create_or_resume(path, {"top_k": 1}, n_sequences=n, shard_size=n)
    ids = [np.zeros((2, 1), dtype=np.int32)] * n
    lps = [np.zeros((2, 1), dtype=np.float16)] * n
    store.write_shard(0, ids, lps, metric_ce, ce_per_byte=per_byte)
    store.finalize()
    return TopKStore.open(path)


def test_minces_picks_per_domain_follow_the_metric(tmp_path):
    # per token the source wins every sequence; per byte it wins only the second (ties go to the pivot)
    pivot = _store(tmp_path / "p", [2.0, 2.0, 2.0, math.nan], [0.5, 0.5, 0.4, 0.4])
    source = _store(tmp_path / "s", [1.0, 1.0, 1.0, 1.0], [0.6, 0.3, 0.4, math.nan])
    domains = ["code", "code", "chat", "chat"]
    stores = {"pivot": pivot, "src": source}
    assert selection_counts(stores, "ce_per_token", domains) == {
        "code": {"src": 2},
        "chat": {"src": 2},
    }
    per_byte = selection_counts(stores, "ce_per_byte", domains)
    assert per_byte == {"code": {"pivot": 1, "src": 1}, "chat": {"pivot": 2}}
    assert selection_lines(per_byte, "ce_per_byte") == [
        "chat: pivot 100% (2) of 2 sequences by ce_per_byte",
        "code: pivot 50% (1), src 50% (1) of 2 sequences by ce_per_byte",
    ]


class _Table(torch.nn.Module):
    """logits[t] = E[token t]: a model whose gradient is easy to write down."""

    def __init__(self, table: np.ndarray) -> None:
        super().__init__()
        self.E = torch.nn.Parameter(torch.tensor(table, dtype=torch.float32))

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.E[input_ids])


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def test_gradient_norms_and_share_by_hand():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(4, 4))
    # one sequence [0, 1, 2]: positions 0 and 1 are trained (gold 1 and 2); the teacher's q at position 0
    # is (0.25 on id 3, 0.75 on id 1); position 1 has no teacher (the one-hot of its gold token)
    batch = {
        "input_ids": torch.tensor([[0, 1, 2]]),
        "attention_mask": torch.ones(1, 3, dtype=torch.long),
        "labels": torch.tensor([[1, 2, IGNORE_INDEX]]),
        "target_ids": torch.tensor([[[3, 1], [-1, -1], [-1, -1]]]),
        "target_probs": torch.tensor([[[0.25, 0.75], [0.0, 0.0], [0.0, 0.0]]]),
    }
    lam = 0.9
    g_clm, g_fus, cos = gradient_norms(_Table(table), [batch], lam)
    # d(mean CE)/d logits = (softmax - target) / 2 at each trained row; the rows are E[0] and E[1]
    p0, p1 = _softmax(table[0]), _softmax(table[1])
    clm = np.zeros_like(table)
    clm[0] = (p0 - np.eye(4)[1]) / 2
    clm[1] = (p1 - np.eye(4)[2]) / 2
    fus = np.zeros_like(table)
    fus[0] = (p0 - np.array([0.0, 0.75, 0.0, 0.25])) / 2
    fus[1] = clm[1]
    assert g_clm == pytest.approx(lam * np.linalg.norm(clm), rel=1e-5)
    assert g_fus == pytest.approx((1 - lam) * np.linalg.norm(fus), rel=1e-5)
    want_cos = float((clm * fus).sum() / np.linalg.norm(clm) / np.linalg.norm(fus))
    assert cos == pytest.approx(want_cos, rel=1e-5)
    r = DomainReport("code", positions=2, covered=1, grad_clm=g_clm, grad_fusion=g_fus, grad_cosine=cos)
    assert r.fusion_share == pytest.approx(g_fus / (g_clm + g_fus))
    line = report_lines({"src": [r]}, "ce_per_byte")[1]
    assert "50.0% with a teacher distribution" in line and f"{100 * r.fusion_share:.1f}%" in line


def test_report_refuses_other_options_and_recipes_without_teachers(tmp_path, fuse_helpers):
    from click.testing import CliRunner

    from fusemerge.cli import main

    recipe = fuse_helpers.write_recipe(
        tmp_path / "r.yml",
        pivot="some/pivot",
        dataset={"path": "data.jsonl"},
        fusion={"function": "none"},
        output=str(tmp_path / "out"),
    )
    result = CliRunner().invoke(main, ["fuse", str(recipe), "--report", "--steps", "train"])
    assert result.exit_code == 2 and "--report runs alone" in result.output
    result = CliRunner().invoke(main, ["fuse", str(recipe), "--report"])
    assert result.exit_code == 2 and "--report diagnoses explicit fusion" in result.output
