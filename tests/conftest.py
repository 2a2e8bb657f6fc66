import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
