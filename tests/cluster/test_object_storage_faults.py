"""Object storage that answers 500 and 503 SlowDown, as S3 does under load: while inference writes the work store
and while the COG is uploaded, the first requests fail (an HTTP proxy in front of the S3 server injects the errors),
segpipe retries with backoff, and the outputs are byte for byte those of a local run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from segpipe.core import objects
from segpipe.pipeline.run import run_scene
from segpipe.pipeline.settings import RunSettings
from tests.cluster.conftest import S3Server, free_port
from tests.cluster.test_object_storage import OPTIONS, local_run, upload_inputs

RULES = [
    {"method": "PUT", "path": r"^/work/", "status": 503, "times": 6},  # work-store chunks: SlowDown
    {"method": "PUT", "path": r"^/work/", "status": 500, "times": 2},
    {"method": "PUT", "path": r"^/out/", "status": 503, "times": 2},  # the COG's upload (one request or parts)
    {"method": "POST", "path": r"^/out/", "status": 500, "times": 1},  # a multipart upload's start or end
]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_500s_and_slow_downs_cost_retries_not_the_run(
    s3: S3Server, data_dir: Path, rgb_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls = upload_inputs(s3, data_dir, rgb_checkpoint)  # directly, before the faults
    (tmp_path / "rules.json").write_text(json.dumps(RULES))
    port, counts = free_port(), tmp_path / "counts.json"
    proxy = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("http_faults.py")), str(port), str(s3.port),
         str(tmp_path / "rules.json"), str(counts)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proxy.stdout is not None and proxy.stdout.readline().strip() == "ready"
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        summary = run_scene(RunSettings(**urls, **OPTIONS))  # type: ignore[arg-type]
    finally:
        proxy.kill()
        proxy.wait()
    served = json.loads(counts.read_text())
    assert served[0] == 6 and served[1] == 2, f"the work store's writes met the faults: {served}"
    assert served[2] + served[3] >= 1, f"the COG's upload met a fault: {served}"
    assert summary["tiles"]["computed"] == summary["tiles"]["total"] - summary["tiles"]["skipped_nodata"]
    mask, probabilities = local_run(data_dir, rgb_checkpoint, tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.url)
    assert objects.read_bytes(urls["output"]) == mask
    assert objects.read_bytes(urls["probabilities"]) == probabilities
