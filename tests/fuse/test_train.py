"""Training a target: the collator's batches, LoRA (only adapters move; the folded save is a plain model),
full fine-tuning with resume from the last checkpoint (compared with an uninterrupted run), the logged loss
of a step at learning rate 0 against the recipe's loss computed directly, and qlora refused off the GPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from fusemerge.checkpoint.layout import TARGET_STAMP
from fusemerge.errors import FusemergeError
from fusemerge.fuse.collate import FusionCollator, FusionDataset, next_token_labels
from fusemerge.fuse.data import build_chat_data
from fusemerge.fuse.loss import IGNORE_INDEX
from fusemerge.fuse.recipe import DatasetSpec, FuseRecipe
from fusemerge.fuse.train import build_trainer, save_target, target_identity, train_target


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_models, chat_jsonl, fuse_helpers):
    """GPT-2-tokenizer pivot (chatml text), 8 sequences, its own store and one aligned source store."""
    root = tmp_path_factory.mktemp("train")
    pivot = str(tiny_models["gpt2"])
    tokenizer = AutoTokenizer.from_pretrained(pivot)
    data = build_chat_data(DatasetSpec(path=str(chat_jsonl), limit=8), tokenizer, "chatml")
    stores = {
        "pivot": fuse_helpers.make_store(root / "pivot", data, tokenizer, seed=1),
        "src": fuse_helpers.make_store(root / "src", data, tokenizer, seed=2, aligned=True, ce_offset=-0.5),
    }
    return {"root": root, "pivot": pivot, "tokenizer": tokenizer, "data": data, "stores": stores}


def recipe_for(setup, **training) -> FuseRecipe:
    raw = {
        "pivot": setup["pivot"],
        "sources": ["org/some-source"],
        "dataset": {"path": "unused.jsonl"},
        "chat_template": "chatml",
        "fusion": {"function": "mince", "lambda": 0.5},
        "training": {
            "mode": "lora",
            "learning_rate": 1e-2,
            "batch_size": 2,
            "gradient_accumulation": 1,
            "max_steps": 2,
            "save_steps": 1,
            "logging_steps": 1,
            "lora_r": 4,
            **training,
        },
        "output": str(setup["root"] / "fused"),
    }
    return FuseRecipe.model_validate({**raw, "raw_yaml": json.dumps(raw)})


def test_collator_pads_shifts_labels_and_attaches_fused_targets(setup):
    ds = FusionDataset(setup["data"], setup["tokenizer"])
    collate = FusionCollator(setup["stores"]["pivot"], {"src": setup["stores"]["src"]}, pad_id=7)
    items = [ds[0], ds[1]]
    batch = collate(items)
    lengths = [len(i["input_ids"]) for i in items]
    width = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, width)
    assert batch["attention_mask"].sum(1).tolist() == lengths
    short = int(np.argmin(lengths))
    assert (batch["input_ids"][short, lengths[short] :] == 7).all()
    assert (batch["labels"][short, lengths[short] :] == IGNORE_INDEX).all()
    # the fused target of a sequence is the lower-CE teacher's rows, as MinCE says
    seq = 0
    pick = min(("pivot", "src"), key=lambda n: setup["stores"][n].sequence(seq).metric_ce)
    rows = setup["stores"][pick].sequence(seq)
    assert (batch["target_ids"][seq, : lengths[seq], : rows.ids.shape[1]].numpy() == rows.ids).all()
    listed = batch["target_probs"][seq, : lengths[seq]].sum(-1)
    has = (rows.ids >= 0).any(1)
    np.testing.assert_allclose(listed.numpy()[has], 1.0, rtol=1e-5)
    assert (listed.numpy()[~has] == 0).all()


def test_labels_are_the_next_assistant_token():
    ids = np.array([5, 6, 7, 8, 9])
    mask = np.array([False, False, True, True, False])
    assert next_token_labels(ids, mask).tolist() == [IGNORE_INDEX, 7, 8, IGNORE_INDEX, IGNORE_INDEX]


def test_a_store_of_other_data_is_refused(setup):
    ds = FusionDataset(setup["data"], setup["tokenizer"])
    item = dict(ds[0])
    item["input_ids"] = item["input_ids"][:-1]
    item["labels"] = item["labels"][:-1]
    with pytest.raises(FusemergeError, match="rows in the pivot store"):
        FusionCollator(setup["stores"]["pivot"], {})([item])


def test_lora_changes_only_adapters_and_the_folded_save_is_a_plain_model(setup):
    recipe = recipe_for(setup)
    trainer = build_trainer(
        recipe, setup["data"], setup["stores"], checkpoints=setup["root"] / "ck-lora", progress=False
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    adapters = [n for n in before if "lora_" in n]
    assert adapters and all(not after[n].requires_grad for n in before if "lora_" not in n)
    assert all(torch.equal(before[n], after[n]) for n in before if "lora_" not in n)
    assert any(not torch.equal(before[n], after[n]) for n in adapters if "lora_B" in n)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(np.isfinite(losses))

    staging = setup["root"] / "ck-lora" / "final"
    trainer.save_model(str(staging))
    out = setup["root"] / "lora-target"
    line = save_target(
        recipe,
        staging,
        out,
        sources=["org/some-source"],
        identity=target_identity(recipe, ["src"], list(setup["stores"].values())),
    )
    assert line.startswith("saved in float32")  # the pivot is float32
    folded = AutoModelForCausalLM.from_pretrained(out)
    names = list(folded.state_dict())
    assert not any("lora" in n or "base_layer" in n for n in names)
    pivot = AutoModelForCausalLM.from_pretrained(setup["pivot"])
    assert names == list(pivot.state_dict())
    # the folded weight is W + (alpha / r) * B @ A of the trained adapter
    peft_model = trainer.model
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * layer.scaling["default"]
    expect = pivot.model.layers[0].self_attn.q_proj.weight + delta.detach()
    torch.testing.assert_close(folded.model.layers[0].self_attn.q_proj.weight, expect, rtol=1e-5, atol=1e-6)
    assert not torch.equal(
        folded.model.layers[0].self_attn.q_proj.weight, pivot.model.layers[0].self_attn.q_proj.weight
    )
    card = (out / "README.md").read_text()
    assert "base_model" not in card.split("---")[1]  # a local pivot path is not a Hub id
    assert "source: `org/some-source`" in card and (out / "tokenizer_config.json").is_file()


class _StopAfterFirstSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        raise KeyboardInterrupt("simulated kill after checkpoint-1")


def test_full_training_resumes_from_the_last_checkpoint_like_an_uninterrupted_run_and_skips_when_done(
    setup, monkeypatch
):
    recipe = recipe_for(setup, mode="full", keep_checkpoints=True)
    ck, out = setup["root"] / "ck-full", setup["root"] / "full-target"
    kwargs = {
        "pivot_store": setup["stores"]["pivot"],
        "aligned": {"src": setup["stores"]["src"]},
        "out": out,
        "checkpoints": ck,
        "progress": False,
    }
    import fusemerge.fuse.train as train_module

    real_build = train_module.build_trainer

    def interrupted(*args, **kw):
        trainer = real_build(*args, **kw)
        trainer.add_callback(_StopAfterFirstSave())
        return trainer

    monkeypatch.setattr(train_module, "build_trainer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_target(recipe, setup["data"], echo=lambda _: None, **kwargs)
    assert (ck / "checkpoint-1").is_dir() and not out.exists()
    monkeypatch.setattr(train_module, "build_trainer", real_build)
    lines: list[str] = []
    train_target(recipe, setup["data"], echo=lines.append, **kwargs)
    assert "resuming from checkpoint-1" in lines[0]
    state = json.loads((ck / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert (out / TARGET_STAMP).is_file() and (out / "model.safetensors").is_file()
    assert not list(out.glob("*.bin"))  # no pickles in a target folder
    # The resumed target is the target an uninterrupted run makes: same weights, same step-2 loss.
    straight = train_target(
        recipe,
        setup["data"],
        **{**kwargs, "out": setup["root"] / "full-straight", "checkpoints": setup["root"] / "ck-straight"},
        echo=lambda _: None,
    )
    resumed, uninterrupted = load_file(out / "model.safetensors"), load_file(straight / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
    pivot = load_file(Path(setup["pivot"]) / "model.safetensors")
    assert any(not torch.equal(pivot[n], t) for n, t in uninterrupted.items())  # training moved weights

    def step_losses(folder):
        log = json.loads((folder / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
        return {h["step"]: h["loss"] for h in log if "loss" in h}

    assert step_losses(ck)[2] == pytest.approx(step_losses(setup["root"] / "ck-straight")[2], rel=1e-6)
    lines.clear()
    train_target(recipe, setup["data"], echo=lines.append, **kwargs)
    assert lines == [f"train {out.name}: target complete, skipped ({out})"]
    changed = recipe_for(setup, mode="full", learning_rate=1e-3, keep_checkpoints=True)
    with pytest.raises(FusemergeError, match="another run's target .* training.learning_rate"):
        train_target(changed, setup["data"], echo=lines.append, **kwargs)


class _LogLines(TrainerCallback):
    def __init__(self) -> None:
        self.lines: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.lines.append(dict(logs or {}))


def test_the_training_log_shows_the_clm_and_fusion_terms(setup):
    """Both terms of the loss are logged per step, in the Trainer's log lines and in trainer_state.json,
    and they recombine to the logged loss: lambda * clm + (1 - lambda) * fusion (accumulation 1)."""
    recipe = recipe_for(setup, mode="lora", max_steps=3, save_steps=3)
    lambda_ = recipe.fusion.lambda_
    ck = setup["root"] / "ck-terms"
    trainer = build_trainer(recipe, setup["data"], setup["stores"], checkpoints=ck, progress=False)
    lines = _LogLines()
    trainer.add_callback(lines)
    trainer.train()
    history = json.loads((ck / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
    steps = [h for h in history if "loss" in h]
    assert [h["step"] for h in steps] == [1, 2, 3]
    for h in steps:
        assert h["clm_loss"] > 0 and h["fusion_loss"] > 0 and h["clm_loss"] != h["fusion_loss"]
        mixed = lambda_ * h["clm_loss"] + (1 - lambda_) * h["fusion_loss"]
        assert mixed == pytest.approx(h["loss"], rel=1e-5, abs=1e-6)
    shown = [line for line in lines.lines if "loss" in line]
    assert [(line["clm_loss"], line["fusion_loss"]) for line in shown] == [
        (h["clm_loss"], h["fusion_loss"]) for h in steps
    ]


def test_qlora_is_a_clear_error_without_a_gpu(setup):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: qlora is allowed here")
    recipe = recipe_for(setup, mode="qlora")
    with pytest.raises(FusemergeError, match="key 'training.mode': qlora needs a CUDA GPU"):
        build_trainer(
            recipe, setup["data"], setup["stores"], checkpoints=setup["root"] / "ck-q", progress=False
        )


def test_gradient_checkpointing_gives_the_same_first_step(setup):
    losses = []
    for checkpointing in (False, True):
        recipe = recipe_for(setup, mode="lora", max_steps=1, gradient_checkpointing=checkpointing)
        trainer = build_trainer(
            recipe,
            setup["data"],
            setup["stores"],
            checkpoints=setup["root"] / f"ck-gc-{checkpointing}",
            progress=False,
        )
        flag = getattr(trainer.args, "activation_checkpointing", None)  # older 5.x: gradient_checkpointing
        assert (trainer.args.gradient_checkpointing if flag is None else flag) is checkpointing
        trainer.train()
        losses.append(next(h["loss"] for h in trainer.state.log_history if "loss" in h))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_one_target_from_every_source_with_avgce_and_kl(setup, fuse_helpers):
    """FuseLLM-style multi-source fusion: one target, every aligned store a candidate, CE-weighted mix."""
    third = fuse_helpers.make_store(
        setup["root"] / "third", setup["data"], setup["tokenizer"], seed=3, aligned=True
    )
    recipe = recipe_for(setup, mode="lora", max_steps=1, keep_checkpoints=True)
    recipe = recipe.model_copy(
        update={
            "fusion": recipe.fusion.model_copy(update={"function": "avgce", "sources": "all", "loss": "kl"})
        }
    )
    out = train_target(
        recipe,
        setup["data"],
        pivot_store=setup["stores"]["pivot"],
        aligned={"org/a": setup["stores"]["src"], "org/b": third},
        out=setup["root"] / "all-target",
        checkpoints=setup["root"] / "ck-all",
        progress=False,
        echo=lambda _: None,
    )
    stamp = json.loads((out / TARGET_STAMP).read_text())
    assert stamp["sources"] == ["org/a", "org/b"] and stamp["fusion"]["function"] == "avgce"
    card = (out / "README.md").read_text()
    assert "source: `org/a`" in card and "source: `org/b`" in card and "- avgce" in card
    log = json.loads((setup["root"] / "ck-all" / "checkpoint-1" / "trainer_state.json").read_text())[
        "log_history"
    ]
    assert all(np.isfinite(h["loss"]) for h in log if "loss" in h)


@pytest.mark.parametrize(("mode", "dtype"), [("lora", "bfloat16"), ("lora", "float32"), ("full", "bfloat16")])
def test_student_weights_dtype(mode, dtype, tmp_path):
    """LoRA in bf16 mixed precision keeps its frozen base in bf16 (half the memory of float32) and its
    adapters in float32; full fine-tuning always keeps float32 master weights."""
    import torch

    from fusemerge.fuse.recipe import FuseRecipe
    from fusemerge.fuse.train import load_student
    from fusemerge.offline.assets import build_random_model

    pivot = build_random_model(tmp_path / "pivot")
    recipe = FuseRecipe.model_validate(
        {
            "pivot": str(pivot),
            "sources": ["source"],
            "dataset": {"path": "chat.jsonl"},
            "output": str(tmp_path / "out"),
            "training": {"mode": mode, "dtype": dtype},
        }
    )
    model = load_student(recipe, cuda=False)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert trained == {torch.float32}
    if mode == "lora":
        assert frozen == {torch.bfloat16 if dtype == "bfloat16" else torch.float32}
    else:
        assert not frozen


def _dense_recipe_loss(logits, labels, target_ids, target_probs, lambda_: float, kind: str) -> float:
    """`lambda * CLM + (1 - lambda) * fusion` in float64 over the full vocabulary, independent of the
    sparse implementation: fusion is -sum_k q_k log p(id_k) (ce), plus sum_k q_k log q_k (kl), and the
    gold token's -log p where the row has no teacher distribution."""
    logp = logits.double().log_softmax(-1)
    keep = labels != IGNORE_INDEX
    clm = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ids = target_ids.long()
    q = torch.where(ids >= 0, target_probs.double(), 0.0)
    fusion = -(q * logp.gather(-1, ids.clamp(min=0))).sum(-1)
    if kind == "kl":
        fusion = fusion + torch.where(q > 0, q * q.clamp(min=1e-300).log(), 0.0).sum(-1)
    fusion = torch.where(q.sum(-1) > 0, fusion, clm)
    return float((lambda_ * clm + (1 - lambda_) * fusion)[keep].mean())


@pytest.mark.parametrize(("lambda_", "kind"), [(0.5, "ce"), (0.3, "kl")])
def test_logged_loss_of_a_step_at_lr_0_is_the_recipes_loss_of_the_collated_batch(setup, lambda_, kind):
    """One optimizer step over all 8 sequences at learning rate 0: the Trainer's logged loss must be the
    recipe's loss (its lambda, its ce or kl) of the pivot on the collated batch, computed here densely."""
    recipe = recipe_for(setup, mode="full", max_steps=1, batch_size=8, save_steps=100, warmup_ratio=0.0)
    # A recipe refuses learning rate 0 (a user mistake); the test sets it past validation so that the
    # step leaves the weights as the pivot's, the weights the direct computation below uses.
    training = recipe.training.model_copy(update={"learning_rate": 0.0})
    fusion = recipe.fusion.model_copy(update={"lambda_": lambda_, "loss": kind})
    recipe = recipe.model_copy(update={"fusion": fusion, "training": training})
    trainer = build_trainer(
        recipe, setup["data"], setup["stores"], checkpoints=setup["root"] / f"ck-lr0-{kind}", progress=False
    )
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]

    ds = FusionDataset(setup["data"], setup["tokenizer"])
    assert len(ds) == 8  # one batch holds every sequence, so the batch is the same whatever the order
    collate = FusionCollator(
        setup["stores"]["pivot"],
        {"src": setup["stores"]["src"]},
        function=recipe.fusion.function,
        temperature=recipe.fusion.temperature,
        pad_id=trainer.data_collator.pad_id,
    )
    batch = collate([ds[i] for i in range(len(ds))])
    pivot = AutoModelForCausalLM.from_pretrained(setup["pivot"], dtype=torch.float32)
    trained = dict(trainer.model.named_parameters())
    assert all(torch.equal(p, trained[n].detach().cpu()) for n, p in pivot.named_parameters())
    with torch.no_grad():
        logits = pivot(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = _dense_recipe_loss(
        logits, batch["labels"], batch["target_ids"], batch["target_probs"], lambda_, kind
    )
    assert logged == [pytest.approx(expected, rel=1e-5)]
    # The check can tell recipes apart: another lambda, or the other loss, gives another number.
    other_kind = "ce" if kind == "kl" else "kl"
    for other in (
        _dense_recipe_loss(logits, batch["labels"], batch["target_ids"], batch["target_probs"], 0.9, kind),
        _dense_recipe_loss(
            logits, batch["labels"], batch["target_ids"], batch["target_probs"], lambda_, other_kind
        ),
    ):
        assert abs(other - expected) > 1e-3 * expected


# ---------------------------------------------------------------- issue 16: training integrity


def _poisoned_copy(store, folder: Path) -> Path:
    """A copy of a finished store with +Inf in some log-probabilities of every sequence (a corrupt store)."""
    import shutil

    from safetensors.numpy import load_file as load_np
    from safetensors.numpy import save_file as save_np

    from fusemerge.fuse.store import STORE_FORMAT

    shutil.copytree(store.path, folder)
    for shard in sorted(folder.glob("shard-*.safetensors")):
        tensors = load_np(str(shard))
        lps = tensors["logprobs"].copy()
        lps[::3, 0] = np.inf
        save_np({**tensors, "logprobs": lps}, str(shard), metadata={"format": STORE_FORMAT})
    return folder


def test_a_nonfinite_loss_stops_training_before_the_update_and_publishes_nothing(setup):
    from fusemerge.fuse.store import TopKStore

    root = setup["root"]
    stores = {
        name: TopKStore.open(_poisoned_copy(setup["stores"][name], root / f"poisoned-{name}"))
        for name in ("pivot", "src")
    }
    out, ck = root / "diverged-target", root / "ck-diverged"
    with pytest.raises(FusemergeError) as err:
        train_target(
            recipe_for(setup, mode="full"),
            setup["data"],
            pivot_store=stores["pivot"],
            aligned={"src": stores["src"]},
            out=out,
            checkpoints=ck,
            progress=False,
            echo=lambda _: None,
        )
    line = err.value.one_line()
    assert "training diverged at step 1/2: the loss is nan" in line and str(ck) in line
    assert "no checkpoint was written before it" in line
    assert not out.exists() and not list(ck.glob("checkpoint-*")) and not (ck / "final").exists()


def test_a_nonfinite_gradient_norm_stops_before_the_optimizer_names_the_kept_checkpoint(tmp_path):
    from types import SimpleNamespace

    from fusemerge.fuse.trainer import DivergenceGuard

    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4}')
    guard = DivergenceGuard()
    args = SimpleNamespace(output_dir=str(tmp_path), fp16=False)
    state = SimpleNamespace(global_step=5, max_steps=9)
    guard.observe_loss(torch.tensor(2.5))
    guard.observe_grad_norm(torch.tensor(3.0))
    guard.on_pre_optimizer_step(args, state, None)  # a finite step passes
    guard.observe_loss(torch.tensor(2.5))
    guard.observe_grad_norm(torch.tensor(float("inf")))
    guard.on_pre_optimizer_step(
        SimpleNamespace(output_dir=str(tmp_path), fp16=True), state, None
    )  # fp16: the scaler's
    guard.observe_loss(torch.tensor(2.5))
    guard.observe_grad_norm(torch.tensor(float("nan")))
    with pytest.raises(FusemergeError) as err:
        guard.on_pre_optimizer_step(args, state, None)
    line = err.value.one_line()
    assert "step 6/9: the gradient norm is nan (loss 2.5)" in line
    assert "the last good checkpoint checkpoint-4 is kept" in line


class _KilledWhileSaving(TrainerCallback):
    """After checkpoint-2's files are written, leave it as a kill mid-save does (no trainer state)."""

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 2:
            (Path(args.output_dir) / "checkpoint-2" / "trainer_state.json").write_text('{"global_st')
            raise KeyboardInterrupt


class _KilledBeforeFirstSave(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        raise KeyboardInterrupt


@pytest.mark.parametrize(
    ("mode", "killer"), [("full", _KilledWhileSaving), ("lora", _KilledBeforeFirstSave)], ids=["full", "lora"]
)
def test_a_run_killed_mid_checkpoint_or_before_the_first_resumes_to_the_uninterrupted_target(
    setup, monkeypatch, mode, killer
):
    """A half-written checkpoint is skipped with a line (never `Can't find a valid checkpoint`); LoRA
    adapters are drawn from the seed, so a LoRA run restarted from nothing trains the same target."""
    import fusemerge.fuse.train as train_module

    recipe = recipe_for(setup, mode=mode, max_steps=3, save_steps=1)
    root = setup["root"]
    kwargs = {
        "pivot_store": setup["stores"]["pivot"],
        "aligned": {"src": setup["stores"]["src"]},
        "progress": False,
    }
    straight = train_target(
        recipe,
        setup["data"],
        out=root / f"straight-{mode}",
        checkpoints=root / f"ck-s-{mode}",
        echo=lambda _: None,
        **kwargs,
    )
    real_build = train_module.build_trainer

    def interrupted(*args, **kw):
        torch.rand(7)  # whatever ran before in this process must not matter
        trainer = real_build(*args, **kw)
        trainer.add_callback(killer())
        return trainer

    monkeypatch.setattr(train_module, "build_trainer", interrupted)
    out, ck = root / f"killed-{mode}", root / f"ck-k-{mode}"
    with pytest.raises(KeyboardInterrupt):
        train_target(recipe, setup["data"], out=out, checkpoints=ck, echo=lambda _: None, **kwargs)
    monkeypatch.setattr(train_module, "build_trainer", real_build)
    lines: list[str] = []
    train_target(recipe, setup["data"], out=out, checkpoints=ck, echo=lines.append, **kwargs)
    if mode == "full":
        assert any("checkpoint-2 is incomplete" in line and "removed" in line for line in lines), lines
        assert any("resuming from checkpoint-1" in line for line in lines), lines
    resumed, uninterrupted = load_file(out / "model.safetensors"), load_file(straight / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[n], t) for n, t in uninterrupted.items())


def test_lora_adapters_are_drawn_from_the_training_seed(setup):
    from fusemerge.fuse.train import load_student

    adapters = []
    for noise in (1, 2):
        torch.manual_seed(noise)  # the global RNG as other work left it
        model = load_student(recipe_for(setup), cuda=False)
        adapters.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n})
    assert adapters[0] and all(torch.equal(adapters[0][n], adapters[1][n]) for n in adapters[0])
    other = load_student(recipe_for(setup, seed=7), cuda=False)
    assert any(not torch.equal(adapters[0][n], p) for n, p in other.named_parameters() if "lora_A" in n)
