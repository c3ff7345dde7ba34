"""Ship the student: ``python -m harness export`` picks a study's configuration (the report's best on the
validation objective, or one the user names) and its representative seed run, exports it to ONNX, checks
the ONNX model against PyTorch on real validation images, times both on the CPU, writes a self-contained
package and registers it as a new version in MLflow's Model Registry.

One module per step: ``select`` (which run), ``onnx_export`` (torch -> ONNX), ``verify`` (ONNX == PyTorch),
``timing`` (ms/image), ``package`` (the folder and its README), ``command`` (the CLI step by step). The
registry calls live in ``harness/tracking/registry.py`` (only ``tracking/`` imports mlflow).
"""

from harness.errors import HarnessError


class ExportError(HarnessError):
    """A study, run or model that cannot be exported: one line, exit 2, nothing registered."""

    exit_code = 2
