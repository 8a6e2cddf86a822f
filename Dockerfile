# servekit: a CPU image. Build: docker build -t servekit:0.1.0 .
# Run:   docker run -p 8080:8080 -p 8082:8082 -v $PWD/model_store:/models:ro servekit:0.1.0
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, from the CPU wheel index, so that the package install below does not pull a CUDA build
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /opt/servekit
COPY pyproject.toml README.md ./
COPY servekit ./servekit
RUN pip install . && useradd --create-home --uid 10001 servekit

COPY configs/container.properties /etc/servekit/config.properties
USER servekit
WORKDIR /home/servekit
EXPOSE 8080 8082
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/ping', timeout=2)"
ENTRYPOINT ["servekit"]
CMD ["start", "--foreground", "--ts-config", "/etc/servekit/config.properties"]
