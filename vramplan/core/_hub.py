"""A model's config.json from the Hugging Face Hub, for ids the bundled catalog does not hold.

Only `config.json` is ever fetched (huggingface_hub.hf_hub_download(repo_id, "config.json")),
into the standard Hugging Face cache, so the next run reads it without the network. The
settings are those of every Hugging Face tool, read at each call (huggingface_hub reads them
once, at its import):
  HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE)  the cache only, never the network
  HF_ENDPOINT                               the Hub, or a mirror of it
  HF_TOKEN (else the `hf auth login` token)  gated and private models
  HF_HUB_CACHE, HF_HOME                     where the cache lives (HF_HOME/hub by default)
huggingface_hub is imported here only, and only when neither the catalog nor a local path
answered: `import vramplan` and a bundled-model estimate never load it.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from vramplan.core._errors import ModelError

CONFIG = "config.json"
DEFAULT_ENDPOINT = "https://huggingface.co"   # huggingface_hub/constants.py _HF_DEFAULT_ENDPOINT
CONNECT_TIMEOUT_S = 3.0
ANSWER_TIMEOUT_S = 10.0      # huggingface_hub's own etag_timeout for the same HEAD
# The whole of hf_hub_download for one config.json (a few kB): its timeouts are per read, and it
# resumes a stalled body five times, resetting that count whenever a byte arrives, so a server
# that drips the file never ends it. 30 s is ample for a file that size on any working link.
DOWNLOAD_DEADLINE_S = 30.0


class HubError(ModelError):
    """A Hub model id that could not be turned into a config."""


class HubOfflineError(HubError):
    """Not in the cache, and the Hub is switched off (HF_HUB_OFFLINE) or cannot be reached."""


class HubModelNotFoundError(HubError):
    """The Hub has no such repository (or no config.json in it)."""


class GatedModelError(HubError):
    """A gated or private repository and no token (or one without access)."""


class MalformedConfigError(HubError):
    """config.json came back, but it is not a JSON object."""


# --- settings, read at call time ------------------------------------------------------------------

def _is_true(value: str | None) -> bool:
    # huggingface_hub/constants.py _is_true: "1", "ON", "YES", "TRUE" in any case
    return (value or "").upper() in {"1", "ON", "YES", "TRUE"}


def offline() -> bool:
    return _is_true(os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE"))


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def cache_dir() -> str:
    # huggingface_hub/constants.py: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def token() -> str | None:
    """HF_TOKEN, else the token `hf auth login` stored (huggingface_hub utils/_auth.py get_token
    reads the environment at each call)."""
    from huggingface_hub import get_token

    return os.environ.get("HF_TOKEN") or get_token() or None


# --- the config -----------------------------------------------------------------------------------

def config_file(repo_id: str) -> tuple[str, str] | None:
    """(path of config.json, "cache" or "hub"), or None when huggingface_hub is not installed.
    Raises a HubError subclass for everything else that stands between the id and its file."""
    _check_endpoint(endpoint())          # huggingface_hub reads HF_ENDPOINT at import, and fails there
    try:
        import huggingface_hub
    except ImportError:
        return None
    _check_id(repo_id)
    cached = huggingface_hub.try_to_load_from_cache(repo_id, CONFIG, cache_dir=cache_dir())
    if isinstance(cached, str):
        return cached, "cache"
    if offline():
        raise HubOfflineError(f"unknown model {repo_id!r}: not in the bundled catalog, not a local path, not in "
                              f"the Hugging Face cache ({cache_dir()}), and HF_HUB_OFFLINE keeps the Hub out",
                              hint="unset HF_HUB_OFFLINE to fetch its config.json, or pass a directory with config.json")
    if not _reachable(endpoint()):
        raise HubOfflineError(f"unknown model {repo_id!r}: not in the bundled catalog, not a local path, not in "
                              f"the Hugging Face cache, and {endpoint()} cannot be reached",
                              hint="check the network or HF_ENDPOINT, or pass a directory with config.json")
    _answers(repo_id)
    return _download(huggingface_hub, repo_id), "hub"


def _check_endpoint(url: str) -> None:
    """HF_ENDPOINT must be an http(s) URL with a host and a valid port."""
    parsed = urlparse(url)
    try:
        port = parsed.port
    except ValueError as exc:      # "Port out of range 0-65535", a non-numeric port
        port = exc
    if parsed.scheme not in ("http", "https") or not parsed.hostname or isinstance(port, ValueError):
        raise HubOfflineError(f"HF_ENDPOINT={url!r} is not an http(s) URL of a Hub",
                              hint="fix or unset HF_ENDPOINT (default https://huggingface.co)")


def _check_id(repo_id: str) -> None:
    """huggingface_hub checks an id before it reads the cache or the network (utils/_validators.py
    validate_repo_id, raising HFValidationError, a ValueError): refuse a malformed one here first."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise HubModelNotFoundError(
            f"{repo_id!r} is not a valid Hugging Face model id",
            hint="a Hub id is org/name in letters, digits, '-', '_' and '.', without '--' or '..'; "
                 "`vramplan models` lists the catalog") from None


def _answers(repo_id: str) -> None:
    """One HEAD of the file with a short timeout before huggingface_hub's download, which retries
    a timeout or a server error five times with back-off (its http_backoff): a server that takes
    the connection and never answers, or fails, is an error in seconds rather than minutes. Any
    other answer (the file, a redirect, 401 / 403 / 404) is left to the download to read."""
    import urllib.error
    import urllib.request

    where, auth = endpoint(), token()
    request = urllib.request.Request(f"{where}/{repo_id}/resolve/main/{CONFIG}", method="HEAD",
                                     headers={"Authorization": f"Bearer {auth}"} if auth else {})
    try:
        urllib.request.urlopen(request, timeout=ANSWER_TIMEOUT_S).close()
    except urllib.error.HTTPError as exc:
        if exc.code >= 500:
            raise HubOfflineError(f"cannot fetch {repo_id}/config.json: {where} answered {exc.code}",
                                  hint="the Hub or mirror is failing: try again later, or pass a directory with "
                                       "config.json") from None
    except (urllib.error.URLError, OSError) as exc:   # a timeout, a reset connection
        raise HubOfflineError(f"cannot fetch {repo_id}/config.json: {where} did not answer within "
                              f"{ANSWER_TIMEOUT_S:g} s ({getattr(exc, 'reason', exc)})",
                              hint="check the network or HF_ENDPOINT, or pass a directory with config.json") from None


def _download(huggingface_hub, repo_id: str) -> str:
    from huggingface_hub import errors

    where, auth = endpoint(), token()
    try:
        return _within_deadline(lambda: huggingface_hub.hf_hub_download(
            repo_id, CONFIG, cache_dir=cache_dir(), endpoint=where, token=auth or False, etag_timeout=10), repo_id)
    except errors.GatedRepoError:
        if auth:
            raise GatedModelError(f"{repo_id} is gated and the Hugging Face token has no access to it",
                                  hint=f"accept its license at {where}/{repo_id} with that account") from None
        raise GatedModelError(f"{repo_id} is gated: its config.json needs a Hugging Face token",
                              hint=f"accept its license at {where}/{repo_id}, then set HF_TOKEN") from None
    except errors.RepositoryNotFoundError:
        raise HubModelNotFoundError(
            f"unknown model {repo_id!r}: not in the bundled catalog and not on {where}",
            hint="check the id (org/name); a private model needs HF_TOKEN; `vramplan models` lists the catalog"
        ) from None
    except errors.RevisionNotFoundError:
        raise HubModelNotFoundError(f"{repo_id} has no main revision on {where}",
                                    hint="pass a directory with its config.json") from None
    except errors.RemoteEntryNotFoundError:
        raise HubModelNotFoundError(f"{repo_id} on {where} has no config.json",
                                    hint="it is not a transformers model; pass a directory with config.json") from None
    except errors.HfHubHTTPError as exc:
        status = _status(exc)
        if status in (401, 403):
            raise GatedModelError(f"{repo_id}: {where} refused access to its config.json ({status})",
                                  hint="a gated or private model: set HF_TOKEN to a token with access") from None
        raise HubOfflineError(f"cannot fetch {repo_id}/config.json from {where} ({status or exc.__class__.__name__})",
                              hint="try again later, or pass a directory with config.json") from None
    except _transport_errors() as exc:   # a redirect loop, a timeout, a connection reset mid-body
        reason = (str(exc).splitlines() or [exc.__class__.__name__])[0]
        raise HubOfflineError(f"cannot fetch {repo_id}/config.json from {where}: {reason}",
                              hint="check the network or HF_ENDPOINT, or pass a directory with config.json") from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, OSError) as exc:
        # file_download.py _raise_on_head_call_error: a 403 without X-Error-Code (no access) comes
        # back as LocalEntryNotFoundError raised from the HTTP error
        if _status(exc.__cause__) in (401, 403):
            raise GatedModelError(f"{repo_id}: {where} refused access to its config.json ({_status(exc.__cause__)})",
                                  hint="a gated or private model: set HF_TOKEN to a token with access") from None
        raise HubOfflineError(f"cannot fetch {repo_id}/config.json from {where}: no answer with the file",
                              hint="check the network or HF_ENDPOINT, or pass a directory with config.json") from None


def _within_deadline(download, repo_id: str) -> str:
    """download() in a worker thread, waited for DOWNLOAD_DEADLINE_S at most: nothing in
    huggingface_hub bounds a download's total time. Past the deadline the worker is left to end
    with the process (a daemon thread, writing to an unlinked file), and the partial
    `blobs/*.incomplete` that hf_hub_download keeps for a resume (file_download.py
    _download_to_tmp_and_move) is removed, so the cache holds nothing half-written."""
    import threading     # here: a bundled model's estimate loads this module, never a download

    outcome: dict = {}

    def work():
        try:
            outcome["path"] = download()
        except BaseException as exc:      # handed to the caller, never printed by the thread
            outcome["error"] = exc

    worker = threading.Thread(target=work, name=WORKER, daemon=True)
    _quiet_worker()
    worker.start()
    try:
        worker.join(DOWNLOAD_DEADLINE_S)
    finally:             # past the deadline, or Ctrl-C while waiting
        if worker.is_alive():
            # huggingface_hub/file_download.py: the blobs of models--{org}--{name} (repo_folder_name)
            blobs = Path(cache_dir()) / f"models--{repo_id.replace('/', '--')}" / "blobs"
            for partial in blobs.glob("*.incomplete"):
                partial.unlink(missing_ok=True)
    if worker.is_alive():
        raise HubOfflineError(f"cannot fetch {repo_id}/config.json from {endpoint()}: it did not arrive whole "
                              f"within {DOWNLOAD_DEADLINE_S:g} s",
                              hint="the Hub or mirror is stalling: try again later, or pass a directory with "
                                   "config.json")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["path"]


WORKER = "vramplan-hub-download"


def _not_from_worker(record) -> bool:
    """A logging filter (a callable taking the record): keep what the download worker did not log."""
    return record.threadName != WORKER


def _quiet_worker() -> None:
    """huggingface_hub logs each retry of a stalled download ("Trying to resume download...") to
    stderr through the handler on its root logger (utils/logging.py _configure_library_root_logger);
    the error line says what became of it, so that handler skips the worker's records."""
    import logging       # here: a bundled model's estimate loads this module, never a download

    for handler in logging.getLogger("huggingface_hub").handlers:
        if _not_from_worker not in handler.filters:
            handler.addFilter(_not_from_worker)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The base error of the HTTP library huggingface_hub sends with: httpx2 in 2.x, httpx in 1.x
    (utils/_http.py get_session). Its status errors are HfHubHTTPError, caught before; the rest
    (TooManyRedirects, timeouts, protocol errors) are not OSErrors. requests' (huggingface_hub
    0.x) are, and are caught as OSError."""
    import importlib

    found = []
    for name in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(name).HTTPError)
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def _status(exc) -> int | None:
    return getattr(getattr(exc, "response", None), "status_code", None)


def _reachable(url: str) -> bool:
    """One TCP connect first, so that a machine without a network answers in seconds rather than
    after huggingface_hub's timeouts."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
        return True
    except (OSError, ValueError):
        return False


def read_config(repo_id: str) -> tuple[dict, str] | None:
    """(config dict, where it came from), or None when huggingface_hub is not installed."""
    found = config_file(repo_id)
    if found is None:
        return None
    path, where = found
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError) as exc:   # ValueError: JSONDecodeError, UnicodeDecodeError, a 4,300-digit int
        raise MalformedConfigError(f"config.json of {repo_id} is not valid JSON ({exc})",
                                   hint=f"delete {path} from the Hugging Face cache and fetch it again") from None
    if not isinstance(config, dict):
        raise MalformedConfigError(f"config.json of {repo_id} is not a JSON object",
                                   hint=f"delete {path} from the Hugging Face cache and fetch it again")
    return config, f"Hugging Face {where}: {path}"
