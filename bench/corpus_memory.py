"""Peak memory of loading and tokenizing a corpus, for the pubmed corpus and a synthetic large one.

    python bench/corpus_memory.py                 # ../shared/data/pubmed_abstracts and a 1 GB synthetic corpus
    python bench/corpus_memory.py --size-mb 200   # a smaller synthetic one

Each corpus is measured in a fresh process (the peak resident set size of that process, ru_maxrss).
The process loads the corpus through engine.data.corpus.load_corpus, as a run does, and streams it through
tokenize_corpus into the memory-mapped token cache. The tokenizer is learned once beforehand, on the pubmed
corpus (4,096 tokens), and read from a file. The synthetic corpus is pubmed's lines repeated, each with a
line number, written to a .txt file line by line.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine.core.hardware import cpu_header  # noqa: E402

PUBMED = REPO.parent / "shared" / "data" / "pubmed_abstracts" / "train.txt"


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0])  # kB
    return out


def measure(corpus: str, tokenizer: str, cache: str) -> dict:
    """In this process: load + tokenize, then report peak RSS and counts. A sampler thread keeps the
    peak of the anonymous part (memory the process holds) apart from the file-backed part (pages of
    the memory-mapped Arrow and token files, which the kernel can drop at will)."""
    import threading

    from engine.data.corpus import load_corpus
    from engine.data.tokens import tokenize_corpus
    from engine.data.vocab import load_tokenizer

    peaks = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            for k, v in _status().items():
                peaks[k] = max(peaks[k], v)
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    c = load_corpus([corpus])
    loaded = time.perf_counter() - t
    tok = load_tokenizer(Path(tokenizer))
    splits = tokenize_corpus(c, tok, 0.05, 1, Path(cache))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    done.set()
    sampler.join()
    return {"peak_anon_mib": peaks["RssAnon"] / 1024, "peak_file_mib": peaks["RssFile"] / 1024,"corpus_bytes": Path(corpus).stat().st_size, "documents": len(c.documents), "chars": c.n_chars,
            "train_tokens": int(len(splits.train)), "val_tokens": int(len(splits.val)),
            "peak_rss_mib": peak / 1024, "rss_before_mib": base / 1024, "load_s": loaded,
            "total_s": time.perf_counter() - t}


def synthetic(path: Path, size_mb: int) -> None:
    lines = [ln for ln in PUBMED.read_text(encoding="utf-8").splitlines() if ln.strip()]
    target = size_mb << 20
    written, i = 0, 0
    with path.open("w", encoding="utf-8") as f:
        while written < target:
            ln = f"{i}: {lines[i % len(lines)]}\n"
            f.write(ln)
            written += len(ln.encode("utf-8"))
            i += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", nargs=3, metavar=("CORPUS", "TOKENIZER", "CACHE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(measure(*a.worker)))
        return
    tmp = Path(tempfile.mkdtemp(prefix="corpus-mem-"))
    from engine.data.corpus import load_corpus
    from engine.data.vocab import save_tokenizer, train_tokenizer

    tok_path = save_tokenizer(train_tokenizer(load_corpus([str(PUBMED)]).documents, 4096), tmp)
    big = tmp / f"synthetic-{a.size_mb}mb.txt"
    synthetic(big, a.size_mb)
    rows = {}
    for name, corpus in (("pubmed_abstracts", PUBMED), (f"synthetic {a.size_mb} MB", big)):
        r = subprocess.run([sys.executable, __file__, "--worker", str(corpus), str(tok_path), str(tmp / "cache")],
                           capture_output=True, text=True, check=True)
        rows[name] = json.loads(r.stdout.strip().splitlines()[-1])
    out = {"header": cpu_header(), "rows": rows}
    if a.json:
        print(json.dumps(out, indent=2))
        return
    print(cpu_header())
    print(f"{'corpus':22} {'file MB':>8} {'documents':>10} {'tokens':>12} {'peak RSS':>9} {'anon':>6} {'file-backed':>11} "
          f"{'seconds':>8}   (MiB)")
    for name, r in rows.items():
        print(f"{name:22} {r['corpus_bytes'] / 2**20:>8.1f} {r['documents']:>10,} {r['train_tokens'] + r['val_tokens']:>12,} "
              f"{r['peak_rss_mib']:>9.0f} {r['peak_anon_mib']:>6.0f} {r['peak_file_mib']:>11.0f} {r['total_s']:>8.1f}")
    big.unlink()


if __name__ == "__main__":
    main()
