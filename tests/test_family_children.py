"""Children of an imported Llama, Qwen2 or BioGPT: a dense fine-tune exports back to the family's own transformers
class with our logits, and a soft prompt trained on it exports as a PEFT prompt-tuning adapter that loads
on that class and gives our logits with the prompt in front."""
from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import cli_inproc, tiny
from test_biogpt import _folder as _biogpt_folder
from test_biogpt import tokenizer_files  # noqa: F401 - the fixture the biogpt case takes
from test_model_families import TEXT, _folder, _import

from engine.core.config import from_dict
from engine.model.checkpoint import load_checkpoint
from engine.model.gpt import GPT
from engine.store.rundb import RunDB

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
os.environ["HF_HUB_OFFLINE"] = "1"


def _ours(db: RunDB, run_id: str) -> GPT:
    ck = load_checkpoint(db.latest_checkpoint(run_id)["path"])
    model = GPT(from_dict(ck["config"]).model, ck["vocab_size"])
    model.load_state_dict(ck["model"])
    return model.eval()


@pytest.mark.parametrize("kind", [pytest.param("llama", marks=pytest.mark.quick), "qwen2", "biogpt"])
def test_a_finetune_and_a_prompt_from_an_imported_model_export_back_to_its_class_and_peft(tmp_path, kind, request):
    if kind == "biogpt":  # learned positions with BioGPT's offset, scaled embeddings, untied head
        folder, _ = _biogpt_folder(tmp_path, request.getfixturevalue("tokenizer_files"), tied=False)
    else:  # grouped-query attention, untied head (qwen2: q/k/v biases)
        folder, _ = _folder(tmp_path, kind, False)
    cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
           "biogpt": transformers.BioGptForCausalLM}[kind]
    _base, tok, db, report = _import(tmp_path, folder)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Abnormality {i} of the cardiovascular system, {i}.5 mg/kg in the heart."
                                  for i in range(200)))

    def train(*sets: str) -> str:
        r = cli_inproc(tmp_path, db.path, "train", "demo", *tiny(f"data.corpus={corpus}", "model.n_ctx=32",
                                                                 "train.max_steps=2", *sets))
        assert r.rc == 0, r.stderr
        return r.run_id

    ft = train("stage=finetune", f"parent={report['run_id']}")
    assert from_dict(db.get_run(ft)["config"]).model.family == kind
    ours = _ours(db, ft)
    before = _base.state_dict()
    assert any(not torch.equal(t, before[k]) for k, t in ours.state_dict().items() if k in before), "it trained"

    out = tmp_path / "ft-export"
    e = cli_inproc(tmp_path, db.path, "export-hf", ft, "--out", str(out))
    assert e.rc == 0, e.stderr
    assert json.loads((out / "config.json").read_text())["architectures"] == [cls.__name__]
    back = cls.from_pretrained(str(out)).eval()
    ids = torch.tensor([tok.encode(TEXT).ids])
    with torch.no_grad():
        mine = ours(ids)[0][..., : back.config.vocab_size]
        assert (mine - back(input_ids=ids).logits).abs().max().item() < 1e-4

    pr = train("stage=prompt", f"parent={ft}", "prompt.n_tokens=4")
    dest = tmp_path / "prompt-export"
    e = cli_inproc(tmp_path, db.path, "export-hf", pr, "--out", str(dest))
    assert e.rc == 0, e.stderr
    assert json.loads((dest / "prompt_adapter" / "adapter_config.json").read_text())["num_virtual_tokens"] == 4
    base = cls.from_pretrained(str(dest)).eval()
    model = peft.PeftModel.from_pretrained(base, str(dest / "prompt_adapter")).eval()
    from safetensors.torch import load_file

    prompt = load_file(str(dest / "soft_prompt.safetensors"))["prompt_embeddings"]
    with torch.no_grad():
        theirs = model(input_ids=ids).logits[:, 4:]
        mine = ours(ids, prefix=prompt[None])[0][:, 4:, : base.config.vocab_size]
    assert (theirs - mine).abs().max().item() < 1e-4
