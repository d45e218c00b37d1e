"""The edge with Litestar's after-request hook as a plain function (run in a worker thread)."""

from services.edge import app, errors
from services.edge.main import main
from services.runtime.settings import Settings

app.retry_after_hook = errors.with_retry_after  # type: ignore[assignment]
main(Settings.from_env())
