"""Wall time of the main job (`biasfast run`): the default configuration (target: ≤ 10 minutes on the 2-core CPU),
or the --quick configuration in quick mode."""

import pytest

from benchmarks.conftest import QUICK
from biasfast.apps.run import QUICK as QUICK_CONFIG
from biasfast.apps.run import Experiment, RunConfig, prepare_output


@pytest.mark.benchmark(group="main job")
def test_run_default(bench, tmp_path):
    config = RunConfig(**QUICK_CONFIG) if QUICK else RunConfig()
    out = str(tmp_path / "run")

    def run():
        prepare_output(out, resume=False, overwrite=True)
        return Experiment(config, out, progress=False).run()

    result = bench(run, provider="biasfast", shape="quick" if QUICK else "default", rounds=1, warmup=0)
    assert result["checkpoints"][-1]["step"] == config.steps
