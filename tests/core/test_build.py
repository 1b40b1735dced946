"""The build, the op registry and the behaviour without a usable extension."""

import subprocess
import sys
import textwrap

import torch

import biasfast
from biasfast._core import dispatch, extension


def test_extension_is_built_for_this_torch():
    assert extension.available(), extension.LOAD_ERROR
    assert extension.BUILD_INFO["torch_version"] == torch.__version__
    assert extension.BUILD_INFO["openmp"] is True


def test_info_reports_every_op_with_its_cpu_kernel(capsys):
    text = biasfast.info()
    assert "compiled extension (_C): loaded" in text
    assert torch.__version__ in text
    assert capsys.readouterr().out.strip() == text.strip()
    impls = dispatch.implementations()
    assert "sqdist" in impls and "sampler_step.out" in impls
    for name, impl in impls.items():
        assert impl["cpu"] == "C++", f"{name} has no CPU kernel: a CPU-only build must be complete"
        assert f"  {name} " in text


def test_cli_info_runs():
    result = subprocess.run([sys.executable, "-m", "biasfast", "info"], capture_output=True, text=True, check=True)
    assert "ops (implementation on cpu, with the variant its last call here ran / cuda)" in result.stdout


def test_import_without_extension_works_and_ops_name_the_fix():
    # Simulate a missing/ABI-broken _C: import must succeed, info must say so, ops must raise with the fix.
    script = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "biasfast._C":
                    raise ImportError("undefined symbol: _ZN3c10fake (simulated)")
        sys.meta_path.insert(0, Block())
        import torch, biasfast
        text = biasfast.info()
        assert "UNUSABLE" in text and "simulated" in text, text
        try:
            biasfast.sqdist(torch.ones(2, 3), torch.ones(2, 3))
        except RuntimeError as e:
            assert "pip install --no-build-isolation -e ." in str(e), e
            print("OK")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("OK")
