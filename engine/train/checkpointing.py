"""Checkpoints and resume for every stage: the shared trainer state (optimizer, schedule, counters,
random-number state) plus whatever the stage saves (its model or prompt, masks, data position).

A checkpoint is written atomically (engine.model.checkpoint), recorded in the run database and
announced as a ``checkpoint`` event; restoring one puts the run back exactly where it was, so a
resumed run repeats the uninterrupted one.
"""
from __future__ import annotations

from engine.core.errors import InputError
from engine.data.vocab import TOKENIZER_FILE
from engine.model.checkpoint import FORMAT, checkpoint_name, file_sha256, save_checkpoint
from engine.train.runtime import rng_state, set_rng_state


class Checkpointer:
    def __init__(self, session, stage, opt, sched, counters, scaler=None, precision: str = "fp32"):
        self.s, self.stage, self.opt, self.sched, self.counters = session, stage, opt, sched, counters
        self.precision = precision  # what the products ran in; the tensors saved are fp32 whatever it is
        self.scaler = scaler  # fp16's loss scale is trainer state too

    def save(self, final: bool) -> tuple[str, int]:
        """Write the checkpoint of the current step; returns (path, bytes)."""
        s, c = self.s, self.counters
        path = s.run_dir / "checkpoints" / checkpoint_name(c.step)
        state = {
            "format": FORMAT, "stage": s.cfg.stage, "config": s.cfg.to_dict(), "vocab_size": self.stage.vocab_size,
            "tokenizer": TOKENIZER_FILE, "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "rng": rng_state(), "precision": self.precision, **c.state(), **self.stage.state(),
        }
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        nbytes = save_checkpoint(state, path)
        s.db.add_checkpoint(s.run_id, c.step, c.tokens, str(path), nbytes, final, file_sha256(path))
        return str(path), nbytes

    def restore(self, ck: dict, path: str) -> None:
        if ck.get("vocab_size") != self.stage.vocab_size:
            raise InputError(f"checkpoint {path} was trained with {ck.get('vocab_size')} tokens, the tokenizer has "
                             f"{self.stage.vocab_size}", path=str(path))
        self.stage.load_state(ck)  # first: the optimizer state must match the stage's parameters
        self.opt.load_state_dict(ck["optimizer"])
        self._check_moments(path)
        self.sched.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"])
        if self.scaler is not None and ck.get("grad_scaler"):
            self.scaler.load_state_dict(ck["grad_scaler"])
        self.counters.load_state(ck)
        self.s.db.truncate_metrics(self.s.run_id, self.counters.step)
        self.s.info(f"resumed from {path} at step {self.counters.step}")

    def _check_moments(self, path: str) -> None:
        for group in self.opt.param_groups:
            for p in group["params"]:
                moment = self.opt.state.get(p, {}).get("exp_avg")
                if moment is not None and moment.shape != p.shape:
                    # checkpoints from before masked matrices were stored packed hold dense moments
                    raise InputError(f"checkpoint {path} holds optimizer state of shape {tuple(moment.shape)} for a "
                                     f"parameter of shape {tuple(p.shape)}: it was written by an older version and "
                                     "cannot be resumed; fine-tune or export from it, or start a new run", path=str(path))
