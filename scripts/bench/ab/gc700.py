"""The edge collecting its youngest GC generation at CPython's default threshold (700)."""

from services.edge.main import main
from services.runtime import service
from services.runtime.settings import Settings

service.YOUNG_GC_THRESHOLD = 700
main(Settings.from_env())
