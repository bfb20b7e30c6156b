"""The recipes of the conformance suite: mergekit 0.1.5's own tests and examples, and model-card recipes.

Texts are `string.Template`s over tiny model folders ($a, $b, $c: independent random "picollama" models as
mergekit's tests build them; $tbase, $tchatml, $tpadded, $tspecial, $teot: the tokenizer-test models;
$gpt2, $granite_a, $granite_b). Each case names where its recipe comes from. mergekit's test recipes are
built in Python there (`MergeConfiguration(...)`); here they are written out as the YAML a user would
give `mergekit-yaml`. The example files are not in mergekit's sdist; they are copied from its repository's
`examples/` with model names replaced.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    name: str
    source: str
    recipe: str
    seed: int | None = None
    # "moe": a mergekit-moe recipe (mergekit-moe instead of mergekit-yaml)
    tool: str = "mergekit-yaml"


def _two(method: str, params: str = "", base: str | None = None, a: str = "$a", b: str = "$b") -> str:
    """mergekit's tests/test_basic_merges.py `two_model_config`: weights 0.6 and 0.4, bfloat16."""
    text = f"merge_method: {method}\n"
    if base:
        text += f"base_model: {base}\n"
    text += (
        f"models:\n  - model: {a}\n    parameters: {{weight: 0.6}}\n"
        f"  - model: {b}\n    parameters: {{weight: 0.4}}\n"
        "dtype: bfloat16\n"
    )
    if params:
        text += f"parameters: {{{params}}}\n"
    return text


def _tok(models: list[str], *, method: str = "linear", extra: str = "", params: str = "") -> str:
    """mergekit's tests/test_tokenizer.py `make_config`: weight 1.0 each, float32, base $tbase."""
    lines = [f"merge_method: {method}", "base_model: $tbase", "models:"]
    lines += [f"  - model: {m}\n    parameters: {{weight: 1.0}}" for m in models]
    lines.append("dtype: float32")
    if params:
        lines.append(f"parameters: {{{params}}}")
    return "\n".join(lines) + "\n" + extra


BASIC = "mergekit tests/test_basic_merges.py::"
TOKENIZER = "mergekit tests/test_tokenizer.py::"
CHAT = "mergekit tests/test_chat_template.py::"
EXAMPLE = "mergekit examples/"
CARD = "model-card style"

CASES: list[Case] = [
    # -- tests/test_basic_merges.py ------------------------------------------------------------------
    Case(
        "granite_copy",
        BASIC + "test_granite_copy",
        "merge_method: passthrough\nmodels:\n  - model: $granite_a\ndtype: bfloat16\n",
    ),
    Case(
        "granite_linear", BASIC + "test_granite_linear_merge", _two("linear", a="$granite_a", b="$granite_b")
    ),
    Case(
        "granite_slerp",
        BASIC + "test_granite_slerp",
        "merge_method: slerp\nbase_model: $granite_a\nmodels:\n  - model: $granite_a\n  - model: $granite_b\n"
        "parameters: {t: 0.5}\ndtype: bfloat16\n",
    ),
    Case(
        "gpt2_copy",
        BASIC + "test_gpt2_copy",
        "merge_method: passthrough\nmodels:\n  - model: $gpt2\ndtype: bfloat16\n",
    ),
    Case(
        "gpt2_stack",
        BASIC + "test_gpt2_stack",
        "merge_method: passthrough\nslices:\n  - sources: [{model: $gpt2, layer_range: [0, 2]}]\n"
        "  - sources: [{model: $gpt2, layer_range: [0, 2]}]\ndtype: bfloat16\n",
    ),
    Case(
        "passthrough_scale",
        BASIC + "test_passthrough_scale",
        "merge_method: passthrough\nmodels:\n  - model: $a\n    parameters:\n      scale:\n"
        "        - {filter: o_proj, value: 0}\n        - {value: 1}\n",
    ),
    Case("linear", BASIC + "test_linear_merge", _two("linear")),
    Case("slerp", BASIC + "test_slerp_merge", _two("slerp", "t: 0.35", base="$a")),
    *[
        Case(
            f"nuslerp_{'c' if base else 'nobase'}_{'rows' if rows else 'cols'}_{'flat' if flat else 'noflat'}",
            BASIC + "test_nuslerp_merges",
            _two(
                "nuslerp",
                f"nuslerp_row_wise: {str(rows).lower()}, nuslerp_flatten: {str(flat).lower()}",
                base=base,
            ),
        )
        for base in (None, "$c")
        for rows in (False, True)
        for flat in (False, True)
    ],
    Case(
        "nuslerp_zero_sum",
        BASIC + "test_nuslerp_merges (weights that sum to zero)",
        _two("nuslerp", "nuslerp_row_wise: false, nuslerp_flatten: false", base="$c")
        .replace("weight: 0.6", "weight: -0.5")
        .replace("weight: 0.4", "weight: 0.5"),
    ),
    Case("task_arithmetic", BASIC + "test_task_arithmetic_merge", _two("task_arithmetic", base="$c")),
    Case("breadcrumbs", BASIC + "test_breadcrumbs_merge", _two("breadcrumbs", base="$c")),
    Case("ties", BASIC + "test_ties_merge", _two("ties", "density: 0.3", base="$c")),
    Case("sce", BASIC + "test_sce_merge", _two("sce", "select_topk: 0.5", base="$c")),
    Case("ram", BASIC + "test_ram_merge", _two("ram", base="$c")),
    Case("ramplus_tl", BASIC + "test_ramplus_tl_merge", _two("ramplus_tl", "r: 0.05, alpha: 1.0", base="$c")),
    Case("multislerp", BASIC + "test_multislerp_merge", _two("multislerp", base="$c")),
    Case("dare_ties", BASIC + "test_dare_ties_merge", _two("dare_ties", "density: 0.66", base="$c"), seed=1),
    Case("model_stock", BASIC + "test_model_stock_merge", _two("model_stock", base="$a", a="$b", b="$c")),
    Case(
        "model_stock_filterwise",
        BASIC + "test_model_stock_filterwise_merge",
        _two("model_stock", "filter_wise: true", base="$a", a="$b", b="$c"),
    ),
    Case("arcee_fusion", BASIC + "test_arcee_fusion_merge", _two("arcee_fusion", base="$a")),
    Case("nearswap", BASIC + "test_nearswap_merge", _two("nearswap", "t: 0.0001", base="$a")),
    Case(
        "della",
        BASIC + "test_della_merge",
        _two("della", "density: 0.66, epsilon: 0.05, lambda: 0.5", base="$c"),
        seed=1,
    ),
    Case(
        "della_invalid_epsilon",
        BASIC + "test_della_invalid_epsilon (mergekit refuses it)",
        _two("della", "density: 0.66, epsilon: 1.35, lambda: 0.5", base="$c"),
        seed=1,
    ),
    Case("karcher", BASIC + "test_karcher_merge", _two("karcher", "max_iter: 5, tol: 1.0e-5", base="$c")),
    # -- tests/test_tokenizer.py ---------------------------------------------------------------------
    Case(
        "tok_mismatched_requires_alignment",
        TOKENIZER + "test_mismatched_vocabulary_requires_alignment (mergekit refuses it)",
        _tok(["$tbase", "$tpadded", "$tchatml"]),
    ),
    Case(
        "tok_source_base",
        TOKENIZER + "test_source_base",
        _tok(["$tbase", "$tpadded", "$tchatml"], extra="tokenizer_source: base\n"),
    ),
    *[
        Case(
            f"tok_task_arithmetic_{source}",
            TOKENIZER + f"test_task_arithmetic_aligns_vocabulary_before_merging[{source}]",
            _tok(["$tbase", "$tchatml"], method="task_arithmetic", extra=f"tokenizer:\n  source: {source}\n"),
        )
        for source in ("base", "union")
    ],
    Case(
        "tok_source_union",
        TOKENIZER + "test_source_union",
        _tok(["$tbase", "$tpadded", "$tchatml"], extra="tokenizer_source: union\n"),
    ),
    Case(
        "tok_source_model",
        TOKENIZER + "test_source_model",
        _tok(["$tbase", "$tpadded", "$tchatml"], extra="tokenizer_source: $tchatml\n"),
    ),
    Case(
        "tok_slerp_union",
        TOKENIZER + "test_slerp_union",
        _tok(["$tbase", "$tchatml"], method="slerp", params="t: 0.5", extra="tokenizer_source: union\n"),
    ),
    Case(
        "tok_force_token",
        TOKENIZER + "test_force_token",
        _tok(
            ["$tbase", "$tchatml"],
            extra="tokenizer:\n  source: union\n  tokens:\n    _tok_10: {source: $tchatml, force: true}\n"
            "    _tok_11: {source: $tbase, force: true}\n",
        ),
    ),
    *[
        Case(
            f"tok_configured_tokens_{kind}",
            TOKENIZER + f"test_configured_tokens_preserve_metadata_and_add_missing[{kind}]",
            "merge_method: linear\nbase_model: $tspecial\nmodels:\n  - model: $tspecial\n    parameters: {weight: 1.0}\n"
            f"dtype: float32\ntokenizer:\n  source: {source}\n  tokens:\n"
            '    "<|existing_special|>": {source: $tspecial, force: true}\n'
            + (
                '    "<|new_configured_token|>":\n      source: {kind: model_token, model: $tspecial, token: _tok_10}\n'
                "      force: true\n"
                if kind == "model-with-missing"
                else ""
            ),
        )
        for kind, source in (("model-with-missing", "$tspecial"), ("base", "base"), ("union", "union"))
    ],
    Case(
        "tok_model_token_id",
        TOKENIZER + "test_model_token_id",
        _tok(
            ["$tbase", "$tchatml"],
            extra="tokenizer:\n  source: base\n  tokens:\n"
            "    _tok_20:\n      source: {kind: model_token, model: $tchatml, token_id: 64}\n      force: true\n"
            '    _tok_21:\n      source: {kind: model_token, model: $tbase, token: "<s>"}\n      force: true\n',
        ),
    ),
    Case(
        "tok_pad_to_multiple_of",
        TOKENIZER + "test_pad_to_multiple_of",
        "merge_method: linear\nbase_model: $tchatml\nmodels:\n  - model: $tchatml\n    parameters: {weight: 1.0}\n"
        "dtype: float32\ntokenizer:\n  source: base\n  pad_to_multiple_of: 16\n",
    ),
    # -- tests/test_chat_template.py -----------------------------------------------------------------
    *[
        Case(
            f"chat_{name}",
            CHAT + test,
            "merge_method: linear\nbase_model: $tbase\nmodels:\n  - model: $tbase\n    parameters: {weight: 0.5}\n"
            f"  - model: $b\n    parameters: {{weight: 0.5}}\ndtype: bfloat16\nchat_template: {value}\n",
        )
        for name, test, value in (
            ("chatml", "test_template_chatml", "chatml"),
            ("literal_jinja", "test_template_literal_jinja", "\"{{messages[0]['content']}}\""),
            (
                "long_literal_jinja",
                "test_template_long_literal_jinja",
                "\"{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\\n{% endfor %}{# "
                + "x" * 300
                + ' #}"',
            ),
            # the other templates mergekit 0.1.5 ships in mergekit/_data/chat_templates/
            ("llama3", "(built-in llama3)", "llama3"),
            ("alpaca", "(built-in alpaca)", "alpaca"),
            ("mistral", "(built-in mistral)", "mistral"),
            ("exaone", "(built-in exaone)", "exaone"),
        )
    ],
    # -- examples/ -----------------------------------------------------------------------------------
    Case(
        "example_linear",
        EXAMPLE + "linear.yml",
        "models:\n  - model: $a\n    parameters:\n      weight: 1.0\n  - model: $b\n    parameters:\n      weight: 0.3\n"
        "  - model: $c\n    parameters:\n      weight: 0.5\nmerge_method: linear\ndtype: float16\n",
    ),
    Case(
        "example_ties",
        EXAMPLE + "ties.yml (its gradients; merge_method ties: ranked_ties is newer than 0.1.5)",
        "models:\n  - model: $a\n    parameters:\n      density: [0.8, 0.3, 0.1]\n      weight: [1.0, 0.8, 0.5]\n"
        "  - model: $b\n    parameters:\n      density: [0.1, 0.4, 0.1]\n      weight: [0.2, 0.8, 0.1]\n"
        "merge_method: ties\nbase_model: $c\nparameters:\ndtype: bfloat16\n",
    ),
    Case(
        "example_bio_merge",
        EXAMPLE + "bio-merge.yml",
        "models:\n  - model: $a\n    parameters:\n      density: 0.5\n      weight: 0.5\n"
        "  - model: $b\n    parameters:\n      density: 0.5\n      weight: 0.5\n"
        "merge_method: ties\nbase_model: $c\nparameters:\n  normalize: false\n  int8_mask: true\ndtype: float16\n",
    ),
    Case(
        "example_gradient_slerp",
        EXAMPLE + "gradient-slerp.yml (its 'pattern' key is not mergekit's: mergekit ignores it)",
        "slices:\n  - sources:\n      - model: $a\n        layer_range: [0, 2]\n      - model: $b\n        layer_range: [0, 2]\n"
        "merge_method: slerp\nbase_model: $a\nparameters:\n  t:\n    - pattern: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n"
        "    - pattern: mlp\n      value: [1, 0.5, 0.7, 0.3, 0]\n    - value: 0.5\ndtype: float16\n",
    ),
    Case(
        "example_orcamini_platy_stack",
        EXAMPLE + "orcamini-platy-44layer.yml",
        "slices:\n  - sources:\n    - model: $a\n      layer_range: [0, 2]\n  - sources:\n    - model: $b\n      layer_range: [1, 2]\n"
        "merge_method: passthrough\ndtype: float16\n",
    ),
    Case(
        "example_arcee_fusion",
        EXAMPLE + "arcee_fusion.yml",
        "models:\n  - model: $a\n  - model: $b\nmerge_method: arcee_fusion\nbase_model: $a\ndtype: bfloat16\n",
    ),
    # -- recipes as model cards give them ------------------------------------------------------------
    Case(
        "card_slerp_filters",
        CARD + " (SLERP with self_attn/mlp gradients, models list)",
        "merge_method: slerp\nbase_model: $a\nmodels:\n  - model: $a\n  - model: $b\nparameters:\n  t:\n"
        "    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n    - filter: mlp\n      value: [1, 0.5, 0.7, 0.3, 0]\n"
        "    - value: 0.5\ndtype: bfloat16\n",
    ),
    Case(
        "card_slerp_slices",
        CARD + " (SLERP over slices, as most SLERP cards have it)",
        "slices:\n  - sources:\n      - model: $a\n        layer_range: [0, 2]\n      - model: $b\n        layer_range: [0, 2]\n"
        "merge_method: slerp\nbase_model: $a\nparameters:\n  t:\n    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n"
        "    - filter: mlp\n      value: [1, 0.5, 0.7, 0.3, 0]\n    - value: 0.5\ndtype: bfloat16\n",
    ),
    Case(
        "card_ties_base_listed",
        CARD + " (TIES, base listed among the models without parameters)",
        "models:\n  - model: $c\n    # no parameters necessary for base model\n  - model: $a\n    parameters:\n      density: 0.5\n"
        "      weight: 0.5\n  - model: $b\n    parameters:\n      density: 0.5\n      weight: 0.3\n"
        "merge_method: ties\nbase_model: $c\nparameters:\n  normalize: true\ndtype: float16\n",
    ),
    Case(
        "card_dare_ties_int8",
        CARD + " (DARE-TIES with int8_mask and normalize)",
        "models:\n  - model: $c\n  - model: $a\n    parameters:\n      density: 0.53\n      weight: 0.4\n"
        "  - model: $b\n    parameters:\n      density: 0.53\n      weight: 0.3\n"
        "merge_method: dare_ties\nbase_model: $c\nparameters:\n  int8_mask: true\n  normalize: true\ndtype: bfloat16\n",
        seed=1,
    ),
    Case(
        "card_linear_int8_mask",
        CARD + " (linear with int8_mask, unused by linear)",
        "merge_method: linear\nmodels:\n  - model: $a\n    parameters: {weight: 0.5}\n  - model: $b\n    parameters: {weight: 0.5}\n"
        "parameters:\n  int8_mask: true\ndtype: bfloat16\n",
    ),
    Case(
        "card_task_arithmetic_normalize",
        CARD + " (task arithmetic with normalize, float32 working, bf16 out)",
        "merge_method: task_arithmetic\nbase_model: $c\nmodels:\n  - model: $a\n    parameters: {weight: 0.7}\n"
        "  - model: $b\n    parameters: {weight: 0.5}\nparameters:\n  normalize: true\ndtype: float32\nout_dtype: bfloat16\n",
    ),
    Case(
        "card_model_stock",
        CARD + " (model_stock, base listed)",
        "models:\n  - model: $b\n  - model: $c\nmerge_method: model_stock\nbase_model: $a\ndtype: bfloat16\n",
    ),
    Case(
        "card_sce_topk",
        CARD + " (SCE with select_topk 1.0 and weights)",
        "models:\n  - model: $a\n    parameters: {weight: 1.0}\n  - model: $b\n    parameters: {weight: 1.0}\n"
        "merge_method: sce\nbase_model: $c\nparameters:\n  select_topk: 1.0\ndtype: bfloat16\n",
    ),
    Case(
        "card_same_size_other_tokens",
        CARD + " (tokenizer_source: a model; same vocab size, different added tokens)",
        "merge_method: linear\nbase_model: $tchatml\nmodels:\n  - model: $tchatml\n    parameters: {weight: 0.5}\n"
        "  - model: $teot\n    parameters: {weight: 0.5}\ndtype: float32\ntokenizer_source: $tchatml\n",
    ),
    Case(
        "moe_random_gates",
        "mergekit-moe (gate_mode: random, --random-seed 1)",
        "base_model: $tbase\ngate_mode: random\ndtype: float32\nexperts:\n  - source_model: $tpadded\n"
        "    positive_prompts: [one]\n  - source_model: $tbase\n    positive_prompts: [two]\n",
        seed=1,
        tool="mergekit-moe",
    ),
]
