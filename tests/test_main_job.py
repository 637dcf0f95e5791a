"""The README's main job, end to end (slow: about 17 minutes on 2 CPU cores; run with pytest -m slow)."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_main_job_translates_within_20_minutes(tmp_path):
    t0 = time.time()
    subprocess.run([sys.executable, str(REPO / "train.py")], cwd=tmp_path, check=True, capture_output=True)
    minutes = (time.time() - t0) / 60
    summary = json.loads((tmp_path / "runs" / "demo" / "eval_tst-COMMON.json").read_text())
    assert summary["st_bleu"] >= 20 and summary["asr_wer"] <= 30, summary
    assert minutes <= 20, minutes
