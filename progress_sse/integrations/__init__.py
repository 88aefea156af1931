"""Task queues whose tasks report progress with one decorator (Celery, ARQ)."""
