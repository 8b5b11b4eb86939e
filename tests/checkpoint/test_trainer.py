"""A converted Hugging Face folder fine-tunes with the ``transformers`` Trainer, as the README says (issue 15,
item 3): ``kanc.load`` of a streamed folder, a few Trainer steps on the CPU, every rational trained, the result saved
with ``kanc.save`` and reloaded converted. The Trainer needs ``accelerate`` (installed with the "zoo" extra that
``make test`` installs)."""

import math

import torch
import transformers
from conftest import ids

import kanc
from kanc.nn import GroupRational


def _rationals(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{p}": getattr(m, p).detach().clone()
        for name, m in model.named_modules()
        if isinstance(m, GroupRational)
        for p in ("numerator", "denominator")
    }


class _Tokens(torch.utils.data.Dataset):
    """Language-model examples: random token ids, labels = inputs (the model shifts them)."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        x = ids(100 + i)[0]
        return {"input_ids": x, "labels": x.clone()}


def test_a_streamed_folder_fine_tunes_with_the_trainer_and_reloads_converted(llama_dir, tmp_path):
    src, _ = llama_dir
    kanc.convert_checkpoint(src, tmp_path / "grkan", target="grkan")
    model = kanc.load(tmp_path / "grkan").train()
    before = _rationals(model)
    assert len(before) == 2 * 3  # one fitted rational per decoder layer's MLP, numerator and denominator

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens())
    out = trainer.train()

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses), losses
    assert math.isfinite(out.training_loss)
    after = _rationals(trainer.model)
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    assert sorted(moved) == sorted(before), f"rationals the Trainer did not train: {sorted(set(before) - set(moved))}"
    assert all(bool(torch.isfinite(t).all()) for t in after.values())

    tuned = trainer.model.eval()
    kanc.save(tuned, tmp_path / "tuned")
    again = kanc.load(tmp_path / "tuned").eval()
    x = ids(7)
    with torch.no_grad():
        want, got = tuned(input_ids=x).logits, again(input_ids=x).logits
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert _rationals(again).keys() == after.keys()
