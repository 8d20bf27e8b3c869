# spiffe-pep: slim, non-root. Mount the SVID files (e.g. written by spiffe-helper) and a
# config directory; the default command reads /etc/spiffe-pep/spiffe-pep.yaml.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
# Graphviz's dot draws the identity map of the admin page (/ui); without it the page
# shows the map as a table.
RUN apt-get update \
    && apt-get install -y --no-install-recommends graphviz \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /install /usr/local
RUN useradd --system --uid 10001 --no-create-home spiffe-pep
COPY config/spiffe-pep.yaml config/policy.yaml /etc/spiffe-pep/
USER 10001
EXPOSE 8443
# The admin listener (127.0.0.1:9901 by default) answers /healthz; the slim image has no
# curl, so Python's urllib asks.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:9901/healthz', timeout=2)"]
ENTRYPOINT ["spiffe-pep"]
CMD ["run", "-c", "/etc/spiffe-pep/spiffe-pep.yaml"]
