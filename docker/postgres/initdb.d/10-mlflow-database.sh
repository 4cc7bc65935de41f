#!/usr/bin/env bash
# First start of the stack's PostgreSQL: a second database, owned by its own role, for the
# MLflow tracking server (MLflow creates its tables on start). Airflow's metadata database is
# POSTGRES_DB. Runs in the official image and in airmlops/postgres:local alike.
#
#   MLFLOW_DB_NAME (default mlflow), MLFLOW_DB_USER (default mlflow), MLFLOW_DB_PASSWORD (required)
#
# Names and password reach PostgreSQL as psql variables (:"name" quotes an identifier, :'value'
# a literal), never spliced into the SQL text.
set -euo pipefail

: "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD must be set for the MLflow database}"

psql -v ON_ERROR_STOP=1 --no-password --no-psqlrc \
    --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v db="${MLFLOW_DB_NAME:-mlflow}" \
    -v owner="${MLFLOW_DB_USER:-mlflow}" \
    -v password="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE ROLE :"owner" LOGIN PASSWORD :'password';
CREATE DATABASE :"db" OWNER :"owner";
SQL
echo "10-mlflow-database: database ${MLFLOW_DB_NAME:-mlflow} owned by ${MLFLOW_DB_USER:-mlflow} created"
