"""Light pipeline tasks start without the heavy stack.

Every pipeline task is a fresh process; a curation group or a search proposal that imported
torch, transformers and lm-eval paid seconds for code it never calls (demix.lazy). These run
the real stages in a fresh interpreter and read what it imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .conftest import smoke_config_dict

# curation loads tokenizers through transformers (which imports torch) for any base model's
# tokenizer; the search and evaluation stacks stay out of it; a proposal needs no model at all.
HEAVY = ("torch", "transformers", "lm_eval", "accelerate", "lightgbm", "matplotlib")

CURATE = """
from demix.stages import curate_group_stage, merge_curation_stage, plan_curation_stage

groups = plan_curation_stage(config, out / "plan")
for g in groups:
    curate_group_stage(out / "plan", g, out / f"part-{g}")
merge_curation_stage(out / "plan", [out / f"part-{g}" for g in groups], out / "data")
"""

PROPOSE = """
from demix.data.shards import CuratedData
from demix.stages import predict_stage

predict_stage(config, CuratedData(out / "data"), None, [], 0, out / "h", out / "proposals.json")
"""


def _imported(task: str, config: Path, out: Path) -> list[str]:
    """Run a stage in a fresh interpreter; the HEAVY modules it imported."""
    script = "\n".join(
        [
            "import json, sys",
            "from pathlib import Path",
            "from demix.config import parse_config",
            "config = parse_config(json.loads(Path(sys.argv[1]).read_text()))",
            "out = Path(sys.argv[2])",
            task,
            f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))",
        ]
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(config), str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_curation_and_proposal_tasks_leave_out_what_they_do_not_call(
    corpus_dir: Path, tmp_path: Path
):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(smoke_config_dict(corpus_dir)))
    out = tmp_path / "out"
    assert _imported(CURATE, config, out) == ["torch", "transformers"]
    assert not {"torch", "transformers", "lm_eval", "accelerate"} & set(
        _imported(PROPOSE, config, out)
    )
    assert json.loads((out / "proposals.json").read_text())


def test_lazy_package_names_resolve_and_unknown_names_fail():
    import pytest

    import demix.evaluate
    import demix.merge
    import demix.report
    import demix.search
    import demix.train

    for package in (demix.evaluate, demix.merge, demix.report, demix.search, demix.train):
        for name in package.__all__:
            assert getattr(package, name) is not None, f"{package.__name__}.{name}"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        demix.search.nope  # noqa: B018
