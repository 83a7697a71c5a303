"""``python -m services.worker``: the worker service."""

from services.common.service import main_for
from services.worker.config import WorkerConfig
from services.worker.server import serve

if __name__ == "__main__":
    main_for(WorkerConfig, serve)
