"""Loss normalisation: one optimizer step's gradient is sum(token losses) / trained tokens of the whole step."""

import functools

import lightning as L
import pytest
import torch

from phi3lit.data import ChatDataModule
from phi3lit.model.lora import LoraSpec
from phi3lit.model.module import Phi3LoRA
from phi3lit.tiny import TINY_DATA


class GradsAtStep(L.Callback):
    """Records the gradients the optimizer used at the first step (after phi3lit's rescaling).

    Lightning zeroes gradients at the start of each step, so the first step's are seen at the second step.
    """

    def __init__(self):
        self.grads = None

    def on_before_zero_grad(self, trainer, pl_module, optimizer):
        if self.grads is None and trainer.global_step == 1:
            self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.requires_grad}


def first_step_grads(tiny_path, data, batch_size, accumulate):
    L.seed_everything(0)
    module = Phi3LoRA(
        pretrained=tiny_path, lora=LoraSpec(dropout=0.0), optimizer=functools.partial(torch.optim.AdamW, lr=0.0)
    )
    dm = ChatDataModule(str(data), val_fraction=0.0, tokenizer=tiny_path, max_length=64, batch_size=batch_size)
    grabber = GradsAtStep()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, accumulate_grad_batches=accumulate, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[grabber],
    )  # fmt: skip
    trainer.fit(module, dm)
    return grabber.grads, module, dm


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("d") / "d.jsonl"
    path.write_text("".join(TINY_DATA.read_text().splitlines(keepends=True)[:24]))
    return path


def test_accumulated_step_equals_one_big_batch(tiny_path, data):
    accumulated, module, dm = first_step_grads(tiny_path, data, batch_size=1, accumulate=4)
    # The same four rows (the sampler's order is independent of batch size), as one batch, by hand.
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(0)
    rows = [dm.rows["train"][i] for i in list(iter(loader.sampler))[:4]]
    from phi3lit.data import collate

    module.zero_grad()
    loss_sum, n, _ = module.token_losses(collate(rows, pad_id=0))
    (loss_sum / n).backward()
    expected = {k: p.grad for k, p in module.named_parameters() if p.requires_grad}
    tokens = [module.token_losses(collate([r], pad_id=0))[1].item() for r in rows]
    assert len(set(tokens)) > 1  # rows carry different numbers of trained tokens: the case that matters
    for k in expected:
        torch.testing.assert_close(accumulated[k], expected[k], atol=1e-6, rtol=1e-4)


def test_micro_batch_size_does_not_change_the_step(tiny_path, data):
    a, _, _ = first_step_grads(tiny_path, data, batch_size=1, accumulate=4)
    b, _, _ = first_step_grads(tiny_path, data, batch_size=4, accumulate=1)
    c, _, _ = first_step_grads(tiny_path, data, batch_size=2, accumulate=2)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(a[k], c[k], atol=1e-6, rtol=1e-4)
