"""Reading the model registry quickly: aliases, versions and runs, never hanging.

An ``http(s)`` tracking URI is read through MLflow's REST API with a short timeout per call and
no retries (MLflow's client would retry for minutes against a dead server); any other URI
(``sqlite:``, ``file:``...) goes through ``MlflowClient``. Both readers answer with MLflow's REST
JSON shapes, so callers handle one form. Nothing here writes: registering and moving aliases is
:mod:`airmlops.training.registry`.
"""

from __future__ import annotations

from typing import Any, Protocol

from airmlops.settings import MlflowClientSettings, get_settings

MLFLOW_CALL_TIMEOUT_SECONDS = 2.0
"""Timeout of each MLflow REST call (connect and read)."""


class RegistryError(RuntimeError):
    """MLflow could not be read; the message says which server and why."""


class RegistryReader(Protocol):
    """Read-only access to the model registry; versions and runs as MLflow REST JSON."""

    def aliases(self, name: str) -> dict[str, str] | None:
        """Alias to version of registered model ``name``; None when the model does not exist."""

    def model_version(self, name: str, version: str) -> dict[str, Any]:
        """The version as MLflow's REST API returns it (``tags`` a list of key/value)."""

    def run(self, run_id: str) -> dict[str, Any] | None:
        """The run as MLflow's REST API returns it; None when it does not exist."""

    def close(self) -> None:
        """Release connections."""


class RestRegistry:
    """MLflow's REST API over ``httpx``: one short timeout per call, no retries.

    Credentials come from MLflow's own variables (``MLFLOW_TRACKING_TOKEN``, or
    ``MLFLOW_TRACKING_USERNAME`` and ``MLFLOW_TRACKING_PASSWORD``) when they are set, read
    through :class:`airmlops.settings.MlflowClientSettings`.
    """

    def __init__(self, tracking_uri: str, timeout: float = MLFLOW_CALL_TIMEOUT_SECONDS,
                 credentials: MlflowClientSettings | None = None) -> None:
        """A client of ``tracking_uri``; ``credentials`` (default: the settings' MLflow client
        section) give the token or user and password, and the TLS settings."""
        import httpx

        credentials = credentials or get_settings().mlflow_client
        self.base = tracking_uri.rstrip("/")
        headers = {"Accept": "application/json"}
        auth = None
        if credentials.tracking_token is not None:
            headers["Authorization"] = f"Bearer {credentials.tracking_token.get_secret_value()}"
        elif credentials.tracking_username:
            auth = (credentials.tracking_username,
                    credentials.tracking_password.get_secret_value())
        # trust_env=False: a proxy configured for the package registries must not see
        # loopback traffic; MLflow's own TLS variables are honoured explicitly.
        verify: bool | str = not credentials.insecure_tls and (
            credentials.server_cert_path or True)
        self._client = httpx.Client(timeout=timeout, headers=headers, auth=auth, verify=verify,
                                    trust_env=False, follow_redirects=False)

    def close(self) -> None:
        """Close the HTTP connections."""
        self._client.close()

    def _get(self, endpoint: str, params: dict[str, str]) -> dict[str, Any] | None:
        """GET ``endpoint`` of MLflow's REST API: its JSON object, or None on a 404."""
        import httpx

        url = f"{self.base}/api/2.0/mlflow/{endpoint}"
        try:
            response = self._client.get(url, params=params)
        except httpx.TimeoutException:
            raise RegistryError(f"MLflow at {self.base} did not answer in time") from None
        except httpx.HTTPError as exc:
            raise RegistryError(f"MLflow at {self.base} is unreachable ({type(exc).__name__})"
                                ) from None
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise RegistryError(f"MLflow at {self.base} answered {response.status_code} to "
                                f"{endpoint}: {_error_message(response)}")
        try:
            body = response.json()
        except ValueError:
            raise RegistryError(f"MLflow at {self.base} answered {endpoint} with non-JSON"
                                ) from None
        if not isinstance(body, dict):
            raise RegistryError(f"MLflow at {self.base} answered {endpoint} unexpectedly")
        return body

    def aliases(self, name: str) -> dict[str, str] | None:
        """Alias to version of registered model ``name``; None when the model does not exist."""
        body = self._get("registered-models/get", {"name": name})
        if body is None:
            return None
        model = body.get("registered_model") or {}
        return {str(a.get("alias")): str(a.get("version"))
                for a in model.get("aliases") or [] if isinstance(a, dict)}

    def model_version(self, name: str, version: str) -> dict[str, Any]:
        """Version ``version`` of ``name``; a missing one is a :class:`RegistryError`."""
        body = self._get("model-versions/get", {"name": name, "version": version})
        if body is None or not isinstance(body.get("model_version"), dict):
            raise RegistryError(f"version {version} of {name!r} is aliased but not found")
        return body["model_version"]

    def run(self, run_id: str) -> dict[str, Any] | None:
        """Run ``run_id``; None when it does not exist."""
        body = self._get("runs/get", {"run_id": run_id})
        return None if body is None else body.get("run")


class ClientRegistry:
    """``MlflowClient`` for tracking URIs that are not HTTP (``sqlite:``, ``file:``...)."""

    def __init__(self, tracking_uri: str) -> None:
        """A client of ``tracking_uri`` (tracking and registry)."""
        from mlflow import MlflowClient

        self._client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def close(self) -> None:
        """Nothing to release."""

    def aliases(self, name: str) -> dict[str, str] | None:
        """Alias to version of registered model ``name``; None when the model does not exist."""
        from mlflow.exceptions import MlflowException

        try:
            model = self._client.get_registered_model(name)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise RegistryError(f"MLflow: {exc.message}") from None
        return {str(alias): str(version) for alias, version in model.aliases.items()}

    def model_version(self, name: str, version: str) -> dict[str, Any]:
        """Version ``version`` of ``name`` in MLflow's REST form."""
        found = self._client.get_model_version(name, version)
        return {
            "name": found.name, "version": str(found.version), "run_id": found.run_id,
            "status": found.status, "creation_timestamp": found.creation_timestamp,
            "aliases": list(found.aliases),
            "tags": [{"key": k, "value": v} for k, v in (found.tags or {}).items()],
        }

    def run(self, run_id: str) -> dict[str, Any] | None:
        """Run ``run_id`` in MLflow's REST form; None when it does not exist."""
        from mlflow.exceptions import MlflowException

        try:
            run = self._client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise RegistryError(f"MLflow: {exc.message}") from None
        return {
            "info": {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id},
            "data": {
                "metrics": [{"key": k, "value": v} for k, v in run.data.metrics.items()],
                "tags": [{"key": k, "value": v} for k, v in run.data.tags.items()],
            },
        }


def registry_reader(tracking_uri: str, timeout: float = MLFLOW_CALL_TIMEOUT_SECONDS
                    ) -> RestRegistry | ClientRegistry:
    """The right reader for ``tracking_uri``: REST for ``http(s)``, else ``MlflowClient``."""
    if tracking_uri.startswith(("http://", "https://")):
        return RestRegistry(tracking_uri, timeout)
    return ClientRegistry(tracking_uri)


def _error_message(response: Any) -> str:
    """The ``message`` of an MLflow error response (at most 200 characters), or "no details"."""
    try:
        body = response.json()
    except ValueError:
        return "no details"
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])[:200]
    return "no details"
