"""benchmarks/gpu_check.sh runs where there is no GPU: dry, every section at toy size on the CPU, and
writes its table. (On a GPU machine the same script checks and measures the real thing.)"""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_dry_without_a_gpu(tmp_path):
    out = tmp_path / "gpu_check.md"
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = out.read_text()
    assert "DRY RUN" in table and "CUDA tests collected" in table
    for row in ("training, tiny preset", "decode, batch 1", "decode, batch 2", "one GRPO step",
                "torchrun, 2 rank(s) over gloo", "profile"):
        assert row in table, row
    assert "FAILED" not in table
    assert "; - GPU kernels per decode step" in table  # not measured on the CPU (it once printed "None")
    log = (tmp_path / "gpu_check.md.log").read_text()
    assert re.findall(r"^===== (\w+): exit 0", log, flags=re.M) == ["tests", "train", "decode", "grpo", "torchrun",
                                                                              "profile"]
    assert "training step" in (tmp_path / "gpu_check.md.profile.txt").read_text()


def test_the_gpu_run_collects_every_test_file_with_cuda_cases():
    """gpu_check names its CUDA test files (a GPU machine may lack what other test files import);
    a file whose tests take conftest's `device` fixture (CUDA cases) must be among them."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check import CUDA_TEST_FILES

    takes_device = re.compile(r"^def test_\w+\([^)]*\bdevice\b", re.M)
    with_cuda_cases = {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py") if takes_device.search(p.read_text())}
    assert with_cuda_cases and with_cuda_cases <= set(CUDA_TEST_FILES)
