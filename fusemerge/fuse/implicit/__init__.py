"""Implicit fusion (FuseChat-3.0, WRPO): the sources answer, the answers are scored, the pivot learns from
the best of them by SFT and then by preference optimisation. No token or vocabulary alignment.

Steps (each resumable, skippable and kill -9 safe, like teach/align/train; see ARCHITECTURE.md,
"Data flows"), and the stage files they exchange under `<work_dir>/implicit/`, JSONL a user can read:

- `sample`  -> `samples/<model>/shard-NNNNN.jsonl`: one line per response
  `{"prompt_id", "domain", "model", "sample_index", "prompt": [messages], "response": str,
    "finish_reason": "stop" | "length", "tokens": int}`; the sampling settings are in the folder's manifest.
  A stopped response is the assistant message's content: without the plain-text turn end its template
  writes after the content (`fusemerge.fuse.implicit.turns`).
- `score`   -> `scores/<model>/shard-NNNNN.jsonl`: the same lines plus
  `{"score": float, "scorer": str, "passed": bool | null, "tie_break": float | null, "detail": str}`.
- `pairs`   -> `sft.jsonl`: `{"messages": [..., {"role": "assistant", "content": best}], "prompt_id",
  "domain", "model", "score"}`; `preference.jsonl`: TRL's conversational preference format
  `{"prompt": [messages], "chosen": [assistant message], "rejected": [assistant message], "prompt_id",
  "domain", "model", "rejected_model", "chosen_score", "rejected_score"}`, plus for WRPO `"chosen_target"`
  (an assistant message list, like `chosen`) and `"chosen_target_score"`: the pivot's own best response
  to the prompt (its on-policy sample), when it has one.
- `sft`, `preference` -> the target model folder(s), trained with TRL.

Prepared data (`implicit.sft_data`, `implicit.preference_data`) in these formats enters at `sft` or
`preference`. The recipe sections are `fusemerge.fuse.implicit.spec`.
"""
