"""The review server runs on the same attention stores as the heatmap tests."""

from tests.viz.conftest import attention_run  # noqa: F401 - a shared fixture
