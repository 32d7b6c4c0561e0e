"""The top-level API: lazy exports that stay what they say whatever was imported before."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_train_is_the_function_after_the_module_is_imported() -> None:
    # the training module is `embseg.training`: a submodule named `train` would become the
    # package attribute `embseg.train` on import and shadow the lazily exported function
    import embseg.training
    from embseg import train

    assert callable(train) and train is embseg.training.train
    import embseg

    assert embseg.train is embseg.training.train


def test_every_public_name_resolves() -> None:
    import embseg

    for name in embseg.__all__:
        assert getattr(embseg, name) is not None, name


def test_import_embseg_does_not_import_torch() -> None:
    # a fresh interpreter: this one has torch already (conftest)
    assert _run("import sys, embseg; embseg.__version__; print('torch' in sys.modules)") == "False"
