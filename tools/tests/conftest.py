import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from illmrec_tools.prepare import REPO_ROOT  # noqa: E402

DATA = REPO_ROOT.parent / "shared" / "data"
ML100K = DATA / "ml100k-posters"
MLSMALL = DATA / "ml-latest-small-posters"
