# stopstep as a base image, and as the pattern for your own training images:
#
#   FROM stopstep:latest             (or: pip install stopstep in your own image)
#   COPY train.py /app/
#   ENTRYPOINT ["stopstep", "run", "--"]
#   CMD ["python", "/app/train.py"]
#
#   docker run -e STOPSTEP_LAST_STEP=5000 my-training-image
#
# stopstep runs as PID 1 here: it adopts and reaps orphans, passes every signal
# it can catch to the training command, and on `docker stop` (SIGTERM) brings the
# whole tree down within --grace-period and exits 143. Give Docker more time than
# that grace period: `docker stop -t 60`, `stop_grace_period: 60s` (compose),
# `terminationGracePeriodSeconds: 60` (Kubernetes).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/stopstep
COPY pyproject.toml README.md ./
COPY stopstep_cli ./stopstep_cli
COPY scripts/fake_trainer.py /opt/stopstep/scripts/fake_trainer.py
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 1000 trainer

USER 1000
WORKDIR /home/trainer
ENTRYPOINT ["stopstep"]
CMD ["run", "--last-step", "50", "--", "python", "/opt/stopstep/scripts/fake_trainer.py", "--rate", "20"]
