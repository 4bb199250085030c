# The meshwave image: the official Airflow 3.3.2 image plus this project's pinned dependencies, its plugins
# (the meshwave library), DAGs, plans and the lab. No secrets and no connections here: they come from the
# environment at run time (docker-compose.yaml, .env).
FROM apache/airflow:3.3.2-python3.11

USER airflow
WORKDIR /opt/meshwave
# The same pins as `make setup` (requirements.txt pins apache-airflow==3.3.2, so the image's Airflow stays).
COPY --chown=airflow:0 requirements.txt constraints.txt ./
RUN pip install --no-cache-dir -r requirements.txt -c constraints.txt

COPY --chown=airflow:0 pyproject.toml ./
COPY --chown=airflow:0 include ./include
COPY --chown=airflow:0 plugins ./plugins
COPY --chown=airflow:0 dags ./dags
# `meshlab` and `meshwave` commands, and the packages importable by every component.
RUN pip install --no-cache-dir --no-deps -e .

ENV AIRFLOW__CORE__DAGS_FOLDER=/opt/meshwave/dags \
    AIRFLOW__CORE__PLUGINS_FOLDER=/opt/meshwave/plugins \
    MESHWAVE_PLANS_DIR=/opt/meshwave/include/plans
WORKDIR /opt/airflow
