import json
import subprocess
import sys

from tests.helpers import ROOT


def test_plot_draws_several_runs(tmp_path):
    for name, scale in (("a", 1.0), ("b", 2.0)):
        run = tmp_path / name
        run.mkdir()
        rows = [{"step": s, "loss": scale * 5 / s, "stability/attn_entropy_min": 2.0, "spectral/clip_rate": 0.5}
                for s in range(1, 6)] + [{"step": 5, "loss": "nan", "val_loss": 3.0}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "p.png"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "plot.py"), str(tmp_path / "a"), str(tmp_path / "b"),
                           "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "plot.py"), str(tmp_path / "nothing")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "no metrics.jsonl" in bad.stderr


def test_train_tokenizer_cli(tmp_path):
    out = tmp_path / "t.model"
    cmd = [sys.executable, str(ROOT / "tools" / "train_tokenizer.py"), "--input", "stdlib:code:val",
           "--vocab-size", "400", "--max-lines", "20000", "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    from data.tokenizer import load_tokenizer

    tok = load_tokenizer(out)
    assert tok.vocab_size == 400 and tok.decode(tok.encode("def f(x):\n    return x\n")) == "def f(x):\n    return x\n"
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr
