# dsrouter in a container: the router only (workers run elsewhere, or use [launcher] with a
# worker command installed in a derived image). Build and run:
#   docker build -t dsrouter .
#   docker run -d --name dsrouter -p 30080:30080 \
#     -v "$PWD/router.toml:/etc/dsrouter/router.toml:ro" dsrouter
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/dsrouter
COPY pyproject.toml README.md LICENSE ./
COPY dsrouter ./dsrouter
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin dsrouter \
    && mkdir -p /etc/dsrouter

USER 10001
EXPOSE 30080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:30080/livez', timeout=2)"]
CMD ["dsrouter", "run", "--config", "/etc/dsrouter/router.toml"]
