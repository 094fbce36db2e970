# CPU image of nvmpriv, installed exactly as the README does (scripts/dev.sh), running the quickstart.
#   docker build -t nvmpriv .
#   docker run --rm -v "$PWD/logs:/app/logs" nvmpriv                       # quickstart on digits
#   docker run --rm nvmpriv .venv/bin/python -m nvmpriv fit --config lightning_configs/texas.yaml
FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends make g++ \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md Makefile ./
COPY scripts ./scripts
COPY nvmpriv ./nvmpriv
COPY lightning_configs ./lightning_configs
COPY tests ./tests
COPY benchmarks ./benchmarks
# Same set-up as `bash scripts/dev.sh setup` on a workstation; TORCH_SPEC / TORCH_INDEX pick
# another torch build (see README, "Choosing another torch build").
ARG TORCH_SPEC="torch===2.13.0 torchvision==0.28.0"
ARG TORCH_INDEX=""
RUN TORCH_SPEC="$TORCH_SPEC" TORCH_INDEX="$TORCH_INDEX" PYTHON=python3 bash scripts/dev.sh setup

CMD ["bash", "scripts/dev.sh", "demo"]
