"""Meeting users' tools: TensorBoard event files, Hub card metadata, checkpoint retention with disk use."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import PUBMED_TRAIN, needs_shared_data, tiny

from engine.store.rundb import RunDB

pytestmark = needs_shared_data()
CORPUS = f"data.corpus={PUBMED_TRAIN}"


def test_tensorboard_event_files_hold_the_runs_loss_scalars_and_its_card_the_hub_metadata(cli, db_path, tmp_path):
    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = cli("train", "demo", *tiny(CORPUS, "train.report_to=['tensorboard']"))
    assert r.rc == 0, r.stderr
    db = RunDB(db_path)
    run_dir = Path(db.get_run(r.run_id)["run_dir"])
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert {"loss", "lr", "val_loss", "counters/flops_spent"} <= set(scalars)
    rows = db.metrics(r.run_id, names=["loss"])
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in acc.Scalars("loss")] == \
        [(m["step"], pytest.approx(m["value"], rel=1e-6)) for m in rows]
    assert [e.step for e in acc.Scalars("val_loss")] == [3, 6]

    # the same run exported: the model card's front matter in the Hub's metadata format
    out = tmp_path / "export"
    e = cli("export-hf", r.run_id, "--out", str(out), "--license", "apache-2.0", "--language", "en")
    assert e.rc == 0, e.stderr
    meta = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert meta["license"] == "apache-2.0" and meta["language"] == ["en"]
    assert meta["datasets"] == [PUBMED_TRAIN.name]
    (result,) = meta["model-index"][0]["results"]
    last = [ev for ev in db.evaluations(r.run_id) if ev["split"] == "val"][-1]
    assert result["dataset"]["split"] == "val"
    assert {m["type"]: m["value"] for m in result["metrics"]} == {
        "loss": pytest.approx(last["metrics"]["loss"], rel=1e-5),
        "perplexity": pytest.approx(last["metrics"]["perplexity"], rel=1e-5)}


@pytest.mark.quick
def test_an_unknown_tracker_is_refused_naming_the_key(tmp_path, capsys):
    from engine.cli import main

    assert main(["train", "demo", *tiny(CORPUS, "train.report_to=['wandb']"), "--db", str(tmp_path / "r.db")]) == 2
    err = capsys.readouterr().err
    assert "train.report_to" in err and "'wandb'" in err and "tensorboard" in err


def test_retention_keeps_the_n_newest_plus_the_best_and_shows_disk_use(cli, db_path):
    # checkpoints at 2, 4, 6, 8 with an evaluation at each
    r = cli("train", "demo", *tiny(CORPUS, "train.max_steps=8", "train.checkpoint_every=2", "train.eval_every=2",
                                   "train.keep_checkpoints=2"))
    assert r.rc == 0, r.stderr
    db = RunDB(db_path)
    loss = {e["step"]: e["metrics"]["loss"] for e in db.evaluations(r.run_id) if e["split"] == "val"}
    best = min(loss, key=lambda s: (loss[s], -s))
    kept = [c["step"] for c in db.checkpoints(r.run_id)]
    assert kept == sorted({6, 8, best})  # at most N + 1
    run_dir = Path(db.get_run(r.run_id)["run_dir"])
    on_disk = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith("."))
    assert len(on_disk) == len(kept)
    assert all(Path(c["path"]).is_file() for c in db.checkpoints(r.run_id))
    shown = json.loads(cli("runs", "show", r.run_id, "--json").stdout)
    assert shown["disk"]["checkpoints"] == len(kept)
    assert shown["disk"]["checkpoint_bytes"] == sum(c["bytes"] for c in db.checkpoints(r.run_id))
    assert shown["disk"]["run_dir_bytes"] > shown["disk"]["checkpoint_bytes"]
    # the run still resumes from what was kept
    resumed = cli("train", "--resume", r.run_id, "--set", "train.max_steps=10")
    assert resumed.rc == 0, resumed.stderr
    assert [c["step"] for c in db.checkpoints(r.run_id)][-2:] == [8, 10]


@pytest.mark.quick
def test_retention_keeps_an_old_best_checkpoint_and_never_deletes_outside_the_run_folder(tmp_path):
    from engine.core.config import RunConfig
    from engine.train.reporter import retain

    db = RunDB(tmp_path / "runs.db")
    rid = db.create_run(name="r", stage="pretrain", config=RunConfig().to_dict())
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(b"x")
    for step, loss in ((2, 5.0), (4, 3.0), (6, 4.0), (8, 4.5), (10, 4.2)):
        f = run_dir / "checkpoints" / f"step{step}.safetensors" if step != 2 else outside
        f.write_bytes(b"x" * step)
        db.add_checkpoint(rid, step, step * 10, str(f), step, step == 10)
        db.add_evaluation(rid, step, "lm", "val", {"loss": loss})
    assert retain(db, rid, 2, run_dir) == [2, 6]
    assert [c["step"] for c in db.checkpoints(rid)] == [4, 8, 10]  # the two newest and the best (step 4)
    assert not (run_dir / "checkpoints" / "step6.safetensors").exists()
    assert outside.exists()  # its row is gone, the file outside the run folder is not touched
    assert retain(db, rid, 0, run_dir) == []
