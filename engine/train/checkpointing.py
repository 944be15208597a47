"""Checkpoints and resume for every stage: the shared trainer state (optimizer, schedule, counters,
random-number state) plus whatever the stage saves (its model or prompt, masks, data position).

A checkpoint is written atomically (engine.model.checkpoint) and handed to the reporter, which
records it (its row, and retention of older ones) and announces it; restoring one puts the run
back exactly where it was, so a resumed run repeats the uninterrupted one.

In a process group the checkpoint is the same single file: FSDP shards are gathered to full
tensors (engine.train.distributed.consolidate) and rank 0 writes; on resume every rank reads it and
keeps its own shards. So the file knows no world size, and a run saved by 2 processes resumes on 1
or 4.
"""
from __future__ import annotations

from engine.core.errors import InputError
from engine.data.vocab import TOKENIZER_FILE
from engine.model.checkpoint import FORMAT, checkpoint_name, file_sha256, save_checkpoint
from engine.train.distributed import consolidate, shard_optimizer_state
from engine.train.identity import RunIdentity
from engine.train.reporter import Reporter
from engine.train.runtime import rng_state, set_rng_state


def restore_stage(stage, ck: dict, path: str) -> None:
    """The stage's own state from a checkpoint (model or prompt, data position), before the loop
    wraps the stage's modules for a process group and builds the optimizer on them."""
    if ck.get("vocab_size") != stage.vocab_size:
        raise InputError(f"checkpoint {path} was trained with {ck.get('vocab_size')} tokens, the tokenizer has "
                         f"{stage.vocab_size}", path=str(path))
    stage.load_state(ck)


class Checkpointer:
    def __init__(self, run: RunIdentity, report: Reporter, stage, opt, sched, counters, scaler=None,
                 precision: str = "fp32", par=None, best=None):
        self.run, self.report = run, report
        self.best = best  # the loop's BestKeeper: its state travels with the checkpoint; retention keeps its step
        self.stage, self.opt, self.sched, self.counters = stage, opt, sched, counters
        self.precision = precision  # what the products ran in; the tensors saved are fp32 whatever it is
        self.scaler = scaler  # fp16's loss scale is trainer state too
        self.sharded = par is not None and par.kind == "fsdp"

    def save(self, final: bool) -> tuple[str, int]:
        """Write the checkpoint of the current step; returns (path, bytes). Under FSDP every rank takes
        part in gathering the shards; rank 0 alone writes."""
        run, c = self.run, self.counters
        path = run.run_dir / "checkpoints" / checkpoint_name(c.step)
        if not run.writer and not self.sharded:
            return str(path), 0
        optimizer, stage_state = self.opt.state_dict(), self.stage.state()
        if self.sharded:
            optimizer, stage_state = consolidate(optimizer), consolidate(stage_state)
        if not run.writer:
            return str(path), 0
        state = {
            "format": FORMAT, "stage": run.cfg.stage, "config": run.cfg.to_dict(), "vocab_size": self.stage.vocab_size,
            "tokenizer": TOKENIZER_FILE, "optimizer": optimizer, "scheduler": self.sched.state_dict(),
            "rng": rng_state(), "precision": self.precision, **c.state(), **stage_state,
        }
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        keeping = self.best is not None and self.best.enabled
        if keeping:
            if self.best.best_step == c.step:
                self.best.best_path = str(path)
            state["best_eval"] = self.best.state()
        existed = path.exists()
        nbytes = save_checkpoint(state, path)
        try:
            self.report.checkpoint_saved(c.step, c.tokens, str(path), nbytes, final, file_sha256(path),
                                         keep=run.cfg.train.keep_checkpoints,
                                         **({"best_step": self.best.best_step} if keeping else {}))
        except BaseException:
            if not existed:  # its row could not be written (a disk fault, say): no file without a row
                path.unlink(missing_ok=True)
            raise
        return str(path), nbytes

    def restore(self, ck: dict, path: str) -> None:
        """The trainer's state (the stage's own came first, restore_stage)."""
        self.opt.load_state_dict(shard_optimizer_state(self.opt, ck["optimizer"]) if self.sharded else ck["optimizer"])
        self._check_moments(path)
        self.sched.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"])
        if self.scaler is not None and ck.get("grad_scaler"):
            self.scaler.load_state_dict(ck["grad_scaler"])
        self.counters.load_state(ck)
        if self.best is not None and self.best.enabled:
            self.best.load_state(ck.get("best_eval"))
        self.report.resumed(self.counters.step, path)

    def _check_moments(self, path: str) -> None:
        for group in self.opt.param_groups:
            for p in group["params"]:
                moment = self.opt.state.get(p, {}).get("exp_avg")
                if moment is not None and moment.shape != p.shape:
                    # checkpoints from before masked matrices were stored packed hold dense moments
                    raise InputError(f"checkpoint {path} holds optimizer state of shape {tuple(moment.shape)} for a "
                                     f"parameter of shape {tuple(p.shape)}: it was written by an older version and "
                                     "cannot be resumed; fine-tune or export from it, or start a new run", path=str(path))
