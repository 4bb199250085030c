# The meshwave image: the official Airflow 3.3.2 image plus this project's pinned dependencies, its plugins
# (the meshwave library), DAGs, plans and the lab. No secrets and no connections here: they come from the
# environment at run time (docker-compose.yaml, .env).
FROM apache/airflow:3.3.2-python3.11

USER airflow
WORKDIR /opt/meshwave
# The same pins as `make setup` (requirements.txt pins apache-airflow==3.3.2, so the image's Airflow stays), plus
# the compose shape's auth manager (requirements-compose.txt: FAB, for users, roles and DAG-level access control;
# not in requirements.txt: the tests and `make demo` run the SimpleAuthManager). FAB's flask-appbuilder 5.2.2
# needs python-dateutil<3, so that one pin of constraints.txt (4.0.0) gives way to requirements-compose.txt's.
# Why: README "Dependencies".
COPY --chown=airflow:0 requirements.txt constraints.txt requirements-compose.txt ./
RUN grep -v '^python-dateutil==' constraints.txt > /tmp/constraints-compose.txt \
 && pip install --no-cache-dir -r requirements.txt -r requirements-compose.txt -c /tmp/constraints-compose.txt

COPY --chown=airflow:0 pyproject.toml ./
COPY --chown=airflow:0 include ./include
COPY --chown=airflow:0 plugins ./plugins
COPY --chown=airflow:0 dags ./dags
# `meshlab` and `meshwave` commands, and the packages importable by every component.
# Bytecode compiled once: an editable install has none, and each task run would compile the package again.
RUN pip install --no-cache-dir --no-deps -e . && python -m compileall -q include plugins dags

ENV AIRFLOW__CORE__DAGS_FOLDER=/opt/meshwave/dags \
    AIRFLOW__CORE__PLUGINS_FOLDER=/opt/meshwave/plugins \
    MESHWAVE_PLANS_DIR=/opt/meshwave/include/plans
# Where meshlab writes its kubeconfigs (0600) as the Airflow uid: the lab-kube volume copies this directory's owner.
USER root
RUN mkdir -p /opt/meshlab/kube && chown airflow:0 /opt/meshlab/kube && chmod 0770 /opt/meshlab/kube
USER airflow
WORKDIR /opt/airflow
