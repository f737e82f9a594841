"""Pins the Lightning internals that phi3lit reads (phi3lit/lightning_compat.py) on a real Trainer: an upgrade that
moves or changes one fails here, by name, instead of silently breaking resume positions, logging or signals."""

import lightning as L
import torch

from phi3lit.lightning_compat import accumulating, batches_processed, logging_this_step


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.w(batch).pow(2).mean()
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Record(L.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        row = (trainer.global_step, batches_processed(trainer), accumulating(trainer), logging_this_step(trainer))
        self.rows.append(row)


def test_the_internals_phi3lit_reads_mean_what_it_assumes(tmp_path):
    record = Record()
    trainer = L.Trainer(
        max_steps=4, accumulate_grad_batches=2, log_every_n_steps=2, logger=L.pytorch.loggers.CSVLogger(tmp_path),
        callbacks=[record], enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(Tiny(), torch.utils.data.DataLoader(torch.randn(16, 2), batch_size=2))
    # (optimizer steps done, micro-batches processed this epoch, mid-accumulation, loggers updated now)
    # Lightning flags both micro-batches of a logging step, so phi3lit logs on `not accumulating and logging`.
    assert record.rows == [
        (0, 1, True, False),
        (1, 2, False, False),
        (1, 3, True, True),
        (2, 4, False, True),  # the 2nd optimizer step's last micro-batch: the one phi3lit logs on
        (2, 5, True, False),
        (3, 6, False, False),
        (3, 7, True, True),
        (4, 8, False, True),
    ]


def test_fused_adamw_skips_the_step_that_is_flagged():
    from phi3lit.lightning_compat import skip_step_if

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    p.grad = torch.ones(3)
    skip_step_if(opt, torch.tensor(True))
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3))  # flagged: weights untouched
    skip_step_if(opt, torch.tensor(False))
    opt.step()
    assert (p.detach() < 1).all()  # not flagged: the step is applied


def test_model_checkpoint_leaves_a_last_ckpt_written_by_phi3lit_alone_at_the_end(tmp_path):
    """`last_checkpoint_written`: ModelCheckpoint's end-of-training save of last.ckpt is skipped once told."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from phi3lit.lightning_compat import last_checkpoint_written

    class WriteLastInsideTheEpoch(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == trainer.max_steps:
                path = tmp_path / "last.ckpt"
                trainer.save_checkpoint(path)
                if self.tell:
                    last_checkpoint_written(trainer.checkpoint_callback, path)

    for tell in (False, True):
        marker = WriteLastInsideTheEpoch()
        marker.tell = tell
        trainer = L.Trainer(
            max_steps=2, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[marker, ModelCheckpoint(
                dirpath=tmp_path, save_last=True, every_n_train_steps=100, enable_version_counter=False)],
        )  # fmt: skip
        trainer.fit(Tiny(), torch.utils.data.DataLoader(torch.randn(16, 2), batch_size=2))
        epochs = torch.load(tmp_path / "last.ckpt", weights_only=False)["loops"]["fit_loop"]["epoch_progress"]
        # Lightning's own save after the loop marks the epoch finished; phi3lit's, inside the epoch, does not.
        assert epochs["current"]["completed"] == (0 if tell else 1)
