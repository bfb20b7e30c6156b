"""Training batches: pivot tokens, next-token labels on assistant positions, and the fused sparse targets.

    dataset = FusionDataset(data, pivot_tokenizer)
    collate = FusionCollator(pivot_store, {"solar": aligned_store}, function="mince", pad_id=0)
    batch = collate([dataset[0], dataset[1]])
    # input_ids, attention_mask, labels [B, L]; target_ids int64, target_probs float32 [B, L, W]

The dataset item is only the pivot's tokens: the teacher distributions stay in the memory-mapped stores
until the collator reads the rows of the sequences in its batch and fuses them (in the data-loader
workers when `training.dataloader_workers` > 0), so nothing of size tokens x K is ever held for the
whole dataset. Row t of every store is the distribution over token t + 1, which is exactly what the
student's logits at position t predict, so the rows line up with positions without any shift; the
labels are shifted once here (label[t] = token t + 1 where that token is an assistant token).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fusemerge.errors import FusemergeError
from fusemerge.fuse.fusion import METRICS, Candidate, fuse
from fusemerge.fuse.loss import IGNORE_INDEX
from fusemerge.fuse.store import TopKStore
from fusemerge.lm.chat_data import ChatData
from fusemerge.lm.padding import pad_right
from fusemerge.lm.tokens import ChatTokenizer


class FusionDataset:
    """Sequence i of the dataset as the pivot sees it: {"index", "input_ids", "labels"} (numpy)."""

    def __init__(self, data: ChatData, pivot_tokenizer: Any) -> None:
        self.data = data
        self.tokenize = ChatTokenizer(pivot_tokenizer)

    def __len__(self) -> int:
        return len(self.data.sequences)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ids, mask = self.tokenize(self.data.sequences[index])
        return {"index": index, "input_ids": ids, "labels": next_token_labels(ids, mask)}


def next_token_labels(ids: np.ndarray, assistant: np.ndarray) -> np.ndarray:
    """labels[t] = ids[t + 1] where token t + 1 is an assistant token, else IGNORE_INDEX (as metric_ce)."""
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    if len(ids) > 1:
        labels[:-1] = np.where(assistant[1:], ids[1:], IGNORE_INDEX)
    return labels


class FusionCollator:
    """Pads a list of dataset items and attaches each sequence's fused target, read from the stores.

    Args:
        pivot_store: the pivot's own top-K store (candidate 0: ties go to it).
        aligned: source name -> aligned store (pivot positions and vocabulary, -1 empty slots).
        function: the fusion function (fusion.FUSION_FUNCTIONS).
        metric: what sequence-level choices compare (fusion.METRICS): ce_per_byte or ce_per_token.
        temperature: T in q = softmax(z / T).
        pad_id: the pivot's padding token id.
        with_targets: False for plain CLM (lambda = 1): the stores are not read at all.
    """

    def __init__(
        self,
        pivot_store: TopKStore | None,
        aligned: Mapping[str, TopKStore],
        *,
        function: str = "mince",
        metric: str = "ce_per_byte",
        temperature: float = 1.0,
        pad_id: int = 0,
        with_targets: bool = True,
    ) -> None:
        if with_targets and pivot_store is None:
            raise ValueError("fused targets need the pivot's store")
        self.pivot_store = pivot_store
        self.aligned = dict(aligned)
        self.function = function
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r} ({' or '.join(METRICS)})")
        self.metric = metric
        self.temperature = temperature
        self.pad_id = pad_id
        self.with_targets = with_targets

    def candidates(self, index: int, rows: int) -> list[Candidate]:
        """The pivot's and every source's view of sequence `index`; a store of other rows is refused."""
        out = []
        stores = [("pivot", self.pivot_store), *self.aligned.items()]
        for name, store in stores:
            assert store is not None
            seq = store.sequence(index)
            if len(seq.ids) != rows:
                raise FusemergeError(
                    f"sequence {index} has {len(seq.ids)} rows in the {name} store but {rows} pivot tokens: "
                    "the store was made for other data or another pivot tokenizer; rerun teach/align",
                    file=store.path,
                )
            out.append(Candidate(name, seq.ids, seq.logprobs, seq.metric(self.metric)))
        return out

    def target(self, index: int, input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [T, W], probs float32 [T, W]) of sequence `index`."""
        nxt = np.full(len(input_ids), -1, dtype=np.int64)
        nxt[:-1] = input_ids[1:]
        fused = fuse(
            self.function,
            self.candidates(index, len(input_ids)),
            temperature=self.temperature,
            next_ids=nxt,
        )
        return fused.ids, fused.probs

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        import torch

        b = len(features)
        input_ids, attention = pad_right([f["input_ids"] for f in features], self.pad_id)
        labels, _ = pad_right([f["labels"] for f in features], IGNORE_INDEX)
        width = input_ids.shape[1]
        targets = (
            [self.target(int(f["index"]), np.asarray(f["input_ids"])) for f in features]
            if self.with_targets
            else []
        )
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention),
            "labels": torch.from_numpy(labels),
        }
        if self.with_targets:
            k = max(t[0].shape[1] for t in targets)
            ids = np.full((b, width, k), -1, dtype=np.int64)
            probs = np.zeros((b, width, k), dtype=np.float32)
            for row, (t_ids, t_probs) in enumerate(targets):
                ids[row, : len(t_ids), : t_ids.shape[1]] = t_ids
                probs[row, : len(t_ids), : t_ids.shape[1]] = t_probs
            batch["target_ids"] = torch.from_numpy(ids)
            batch["target_probs"] = torch.from_numpy(probs)
        return batch
