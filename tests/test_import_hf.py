"""import-hf: a Hugging Face GPT-2 folder as a run to start from, and the round trip with export-hf."""
from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import PUBMED_TRAIN, needs_shared_data, tiny

from engine.core.config import from_dict
from engine.store.rundb import RunDB
from engine.data.vocab import load_tokenizer
from engine.model.checkpoint import load_checkpoint
from engine.model.gpt import GPT
from engine.model.sparsity import load_masks

pytestmark = needs_shared_data()
CORPUS = f"data.corpus={PUBMED_TRAIN}"
TEXT = "Abnormality of the cardiovascular system, 3.5 mg/kg <|endoftext|> next"


def _model(db: RunDB, run_id: str) -> tuple[GPT, object]:
    ck = load_checkpoint(db.latest_checkpoint(run_id)["path"])
    model = GPT(from_dict(ck["config"]).model, ck["vocab_size"])
    load_masks(model, ck.get("masks") or {})
    model.load_state_dict(ck["model"])
    tok = load_tokenizer(db.get_run(run_id)["run_dir"] + "/tokenizer.json")
    return model.eval(), tok


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import subprocess
    import sys

    from helpers import REPO, engine_env

    tmp = tmp_path_factory.mktemp("import")
    db = tmp / "runs.db"

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "engine", *args, "--db", str(db)], capture_output=True, text=True,
                           timeout=300, cwd=REPO, env=engine_env(tmp))
        return r

    r = cli("train", "demo", *tiny(CORPUS, "model.n_layer=2", "sparsity.level=0.5", "sparsity.kernel=dense",
                                   "train.max_steps=4"))
    assert r.returncode == 0, r.stderr
    run_id = json.loads(cli("runs", "list", "--json").stdout)[0]["id"]
    out = tmp / "export"
    assert cli("export-hf", run_id, "--out", str(out)).returncode == 0
    return tmp, db, run_id, out, cli


@pytest.fixture(scope="module")
def imported(exported) -> dict:
    """The exported folder imported once (the report of import-hf --json)."""
    r = exported[4]("import-hf", str(exported[3]), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_export_then_import_gives_equal_logits_and_the_same_tokenizer(exported, imported):
    tmp, db_path, run_id, out, cli = exported
    report = imported
    db = RunDB(db_path)
    row = db.get_run(report["run_id"])
    assert row["stage"] == "import" and row["status"] == "completed" and row["meta"]["imported_from"] == str(out)
    a, tok_a = _model(db, run_id)
    b, tok_b = _model(db, report["run_id"])
    assert tok_a.to_str() == tok_b.to_str()
    x = torch.tensor([tok_a.encode(TEXT).ids[:32]])
    with torch.no_grad():
        diff = (a(x)[0] - b(x)[0]).abs().max().item()
    assert diff < 1e-5


def test_an_imported_model_fine_tunes_directly(exported, imported):
    cli, imp = exported[4], imported["run_id"]
    ft = cli("train", "demo", "--set", "stage='finetune'", "--set", f"parent='{imp}'", *tiny(CORPUS, "train.max_steps=2"))
    assert ft.returncode == 0, ft.stderr


@pytest.mark.quick
@pytest.mark.parametrize("files,expect", [
    ({}, "has no config.json"),
    ({"config.json": {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]}}, "unsupported architecture"),
    ({"config.json": {"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2}}, "has no weights"),
])
def test_unsupported_or_incomplete_folders_exit_2_with_one_line(tmp_path, capsys, files, expect):
    from engine.cli import main

    folder = tmp_path / "model"
    folder.mkdir()
    for name, obj in files.items():
        (folder / name).write_text(json.dumps(obj))
    assert main(["import-hf", str(folder), "--db", str(tmp_path / "r.db")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and expect in err[0], err
    assert RunDB(tmp_path / "r.db").list_runs() == []


@pytest.mark.quick
def test_bin_weights_load_as_tensors_only_and_a_pickle_with_code_is_refused(exported, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file

    from engine.cli import main

    _tmp, db_path, _run, out, _cli = exported
    folder = tmp_path / "bin"
    shutil.copytree(out, folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    assert main(["import-hf", str(folder), "--db", str(tmp_path / "r.db"), "--runs-dir", str(tmp_path / "runs")]) == 0

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"x": Evil()}, folder / "pytorch_model.bin")
    capsys.readouterr()
    assert main(["import-hf", str(folder), "--db", str(tmp_path / "r2.db")]) == 2
    assert "weights_only=True refused it" in capsys.readouterr().err
    assert not marker.exists()


def test_the_studio_imports_a_model_and_offers_it_as_a_parent(qtbot, exported, tmp_path):
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from studio.views.main_window import KEEP, MainWindow

    _tmp, _db, _run, out, _cli = exported
    win = MainWindow(tmp_path / "runs.db", tmp_path / "runs", attach=False)
    win.estimate.auto.setChecked(False)
    win.close_policy = KEEP
    qtbot.addWidget(win)
    proc = win.import_model(str(out))
    qtbot.waitUntil(lambda: not proc.is_running() and "imported" in win.statusBar().currentMessage(), timeout=60_000)
    (run,) = RunDB(tmp_path / "runs.db").list_runs()
    assert run["stage"] == "import" and win.browser.item_for(run["id"]) is not None
    assert win.browser.item_for(run["id"]).text(2) == "Imported model"
    win.form.set_field("stage", "finetune")
    assert run["id"] in win.form.editors["parent"].run_ids()
    win.close()


def test_import_to_sparse_pretraining_to_finetune_to_prompt_exports_a_peft_adapter(exported, imported, tmp_path):
    """The whole chain on tiny shapes; the prompt run's export loads with peft and gives our logits."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    _tmp, db_path, _run, out, cli = exported

    def run_id(result) -> str:
        assert result.returncode == 0, result.stderr
        return next(e["run_id"] for e in map(json.loads, filter(lambda ln: ln.startswith("{"), result.stdout.splitlines()))
                    if e["type"] == "run_started")

    imp = imported["run_id"]
    db = RunDB(db_path)
    base, _ = _model(db, imp)
    result = cli("train", "demo", *tiny(CORPUS, f"parent={imp}", "model.n_ctx=32", "sparsity.level=0.8",
                                        "sparsity.distribution=erk", "train.max_steps=2"))
    assert "continuing imported model" in result.stderr
    pre = run_id(result)
    # SPDF on the imported model: one-shot magnitude pruning, each layer keeping its largest weights
    masks = load_checkpoint(db.checkpoints(pre)[0]["path"])["masks"]
    assert from_dict(db.get_run(pre)["config"]).model.n_layer == 2  # the imported shape
    for name, mask in masks.items():
        w = base.get_submodule(name).weight.detach().abs()
        assert w[mask].min() >= w[~mask].max()
    assert abs(1 - sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values()) - 0.8) < 1e-3
    ft = run_id(cli("train", "demo", "--set", "stage='finetune'", "--set", f"parent='{pre}'", *tiny(CORPUS, "train.max_steps=2")))
    pr = run_id(cli("train", "demo", "--set", "stage='prompt'", "--set", f"parent='{ft}'", "--set", "prompt.n_tokens=4",
                    *tiny(CORPUS, "train.max_steps=2")))
    dest = tmp_path / "exported"  # the prompt run's export: the fine-tuned base and its adapter
    e = cli("export-hf", pr, "--out", str(dest))
    assert e.returncode == 0, e.stderr
    cfg = json.loads((dest / "prompt_adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["num_virtual_tokens"] == 4

    base = transformers.GPT2LMHeadModel.from_pretrained(str(dest)).eval()
    model = peft.PeftModel.from_pretrained(base, str(dest / "prompt_adapter")).eval()
    ours, tok = _model(db, ft)  # the prompt run trained on its parent's weights
    from safetensors.torch import load_file

    prompt = load_file(str(dest / "soft_prompt.safetensors"))["prompt_embeddings"]
    ids = torch.tensor([tok.encode(TEXT).ids[:20]])
    with torch.no_grad():
        theirs = model(input_ids=ids).logits[:, 4:]
        mine = ours(ids, prefix=prompt[None])[0][:, 4:]
    assert (theirs - mine).abs().max().item() < 1e-4
    assert int(theirs[0, -1].argmax()) == int(mine[0, -1].argmax())
